"""Deploy the adapter loop's active adapter as a GGUF: merge it into its base, export with the `gguf` method, and keep
one deploy link per base that promote sets and rollback restores.

`$ACF_HOME/deploy/<base name>.gguf` is a symlink to the active adapter's export (`<adapter
dir>/gguf-<TYPE>/model.gguf`); it is replaced atomically (a new link renamed over the old), so a reader sees the old
file or the new one. Each adapter keeps its own export, so a rollback points the link back at the previous adapter's
GGUF.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from acf.core.errors import AcfError
from acf.lifecycle.merge import merge_adapter
from acf.lifecycle.registry_model import acf_home
from acf.methods import StepContext, run_strategy
from acf.methods.strategy import validate_strategy
from acf.models.gguf_file import GGUF_TYPES


def parse_export(spec: Optional[str]) -> Optional[str]:
    """`gguf:Q4_K_M` -> "Q4_K_M" (checked against the known types); None passes through."""
    if spec is None:
        return None

    fmt, _, t = spec.partition(":")
    if fmt != "gguf" or t not in GGUF_TYPES:
        raise AcfError(f"--export {spec!r}: give gguf:TYPE with TYPE one of {', '.join(GGUF_TYPES)}")
    return t


def export_adapter(adapter_dir: Path, base_dir: Path, type_name: str, seed: int = 0) -> Path:
    """Merge the LoRA adapter into a full-precision copy of its base and export it to GGUF `type_name`.

    No importance matrix: the adapter loop has no task calibration split (its rows are the adapter's training
    data), and an imatrix from training rows would fit the quantizer to them. Returns the export directory."""
    import torch

    out = adapter_dir / f"gguf-{type_name}"
    if (out / "model.gguf").is_file():
        return out
    merged = adapter_dir / ".merged"
    if merged.exists():
        shutil.rmtree(merged)
    merge_adapter(adapter_dir, str(base_dir), merged, force=True, dtype=torch.float32)
    try:
        strat = validate_strategy({"steps": [{"method": "gguf", "params": {"type": type_name, "imatrix": False}}]})
        recs = run_strategy(strat, merged, out, StepContext(device="cpu", seed=seed))
        if not recs or recs[-1].status != "ok":
            raise AcfError(f"GGUF export of {adapter_dir} failed: {recs[-1].reason if recs else 'no step ran'}")
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    return out


def deploy_link(base_name: str) -> Path:
    return acf_home() / "deploy" / f"{base_name}.gguf"


def point_deploy_link(link: Path, target: Path) -> None:
    """Make `link` point at `target`, atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.resolve())
    os.replace(tmp, link)
