"""`acf extract`: a student with some of a model's decoder blocks (acf.lifecycle.extract does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from acf.cli.registry_cmd import cli_errors
from acf.core.errors import AcfError
from acf.lifecycle.extract import extract


def _parse_range(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise AcfError(f"--weight-range {text!r}: expected LO,HI (two numbers)") from None
    if lo > hi:
        raise AcfError(f"--weight-range {text!r}: LO must not exceed HI")
    return lo, hi


@cli_errors
def extract_cmd(model: str = typer.Option("smollm2-135m", "--model", help="alias, local directory or hub id"),
                by: str = typer.Option("importance", "--by", help="importance | layers (first N) | weight-range"),
                ratio: Optional[float] = typer.Option(None, "--ratio", help="share of decoder blocks to keep"),
                layers: Optional[int] = typer.Option(None, "--layers", help="number of decoder blocks to keep"),
                weight_range: Optional[str] = typer.Option(None, "--weight-range",
                                                           help="LO,HI: with --by weight-range, drop blocks whose "
                                                                "mean |W| lies in it"),
                recover: Optional[str] = typer.Option(None, "--recover", help="distill | lora (after extraction)"),
                steps: int = typer.Option(50, "--steps", help="recovery steps"),
                out: Path = typer.Option(..., "--out", help="new directory for the student"),
                task: str = typer.Option("gsm8k", "--task", help="calibration / training data"),
                calib_samples: int = typer.Option(32, "--calib-samples"),
                seq_len: int = typer.Option(256, "--seq-len"),
                device: Optional[str] = typer.Option(None, "--device"),
                registry: Optional[Path] = typer.Option(None, "--registry", envvar="ACF_REGISTRY"),
                no_register: bool = typer.Option(False, "--no-register")) -> None:
    """Extract a student: keep decoder blocks chosen by measured importance (or first N / weight range)."""
    r = extract(model, out, by, ratio, layers, recover, steps, _parse_range(weight_range), task, calib_samples,
                seq_len, device, register=not no_register, registry_path=registry)
    typer.echo(f"student: {r.out_dir}: kept blocks {r.kept_layers} of {r.layers_before} (dropped {r.dropped_layers})"
               + (f"; registry id {r.registry_id} (parent {r.parent_id}); see `acf registry compare {r.parent_id} "
                  f"{r.registry_id}`" if r.registry_id else ""))
