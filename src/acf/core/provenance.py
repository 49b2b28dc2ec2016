"""How every number was obtained. A metric without provenance is not recorded."""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, Field


class Measurement(BaseModel):
    """One metric value with how it was obtained (measured on a device, or estimated by a named model)."""

    value: Optional[float]
    how: Literal["measured", "estimated"] = "measured"
    unit: str = ""
    device: str = ""
    runtime: str = ""
    n: Optional[int] = None
    seconds: Optional[float] = None
    ci95: Optional[tuple[float, float]] = None
    method: str = Field("", description="what was measured, or which model estimated it")
    extra: dict = Field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def runtime_string() -> str:
    import torch
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def device_string(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        return f"{device} ({torch.cuda.get_device_name(idx)})"
    cpu = platform.processor() or platform.machine()
    try:
        import os

        cores = len(os.sched_getaffinity(0))
    except Exception:  # not every platform has sched_getaffinity
        import os

        cores = os.cpu_count() or 0
    return f"cpu ({cpu}, {cores} cores, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def git_commit(path: str | None = None) -> Optional[str]:
    """The commit of the acf checkout that made a result, or None outside a git checkout."""
    here = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None
