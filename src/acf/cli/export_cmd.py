"""`acf export` (a run's candidate as a folder with its model card) and `acf merge` (a LoRA adapter merged into its
base). Registered on the `acf` app by acf.cli.main; the work is in acf.lifecycle.export and acf.lifecycle.merge."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from acf.cli.console import console
from acf.core.logsetup import setup_logging


def export_cmd(
    run_dir: Path = typer.Argument(..., help="a run directory (holds frontier.json)"),
    candidate: Optional[str] = typer.Argument(None, help="candidate id (default: the run's recommended pick)"),
    out: Path = typer.Option(..., help="folder to write: the model, README.md (model card), export.json, and a "
                             "Modelfile for a GGUF"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
) -> None:
    """Export a run's candidate: its model, a model card with the run's measured figures, and provenance."""
    from acf.lifecycle.export import export_candidate

    setup_logging(False)
    res = export_candidate(run_dir, candidate, out, force=force)
    console.print(f"exported {res.candidate} ({res.fmt}) to {res.out}: {', '.join(res.files)}")


def merge_cmd(
    adapter_dir: Path = typer.Argument(..., help="a peft LoRA adapter folder (adapter_config.json)"),
    base: Optional[str] = typer.Option(None, help="its base model: alias, local folder or hub id (default: the "
                                       "base the adapter's config names)"),
    out: Path = typer.Option(..., help="folder for the merged model (a plain HF checkpoint)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out folder"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
) -> None:
    """Merge a LoRA adapter into its base (peft merge_and_unload) and save a plain HF model folder."""
    from acf.lifecycle.merge import merge_adapter

    setup_logging(False)
    p = merge_adapter(adapter_dir, base, out, force=force, trust_remote_code=trust_remote_code)
    console.print(f"merged model written to {p}")
