"""The contract every compression method follows: input model dir -> output model dir, plus a step record."""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, Field

from acf.core.atomic import atomic_dir
from acf.core.errors import MethodFailed


class StepRecord(BaseModel):
    """What one step did, measured: persisted in each episode's result and in frontier.json."""

    method: str
    params: dict[str, Any]
    status: str = "ok"                 # ok | failed
    reason: Optional[str] = None       # failure reason (typed kind + message)
    wall_seconds: float = 0.0
    device: str = ""
    peak_memory_bytes: Optional[int] = None
    peak_memory_how: str = ""
    output_dir: Optional[str] = None
    output_size_bytes: Optional[int] = None
    log_path: Optional[str] = None
    extra: dict[str, Any] = Field(default_factory=dict)   # e.g. loss curve, dropped layers, library versions


#: the default share of general text in calibration (--calib-mix), chosen by measurement
#: (experiments/results/recipes-cpu.md): for GPTQ W4 act-order, 0.25 costs +10% task kld for -36% kld_general (with
#: kd_tune after it +6% / -35%); 0.5 costs three to four times as much on the task for little more off it
DEFAULT_CALIB_MIX = 0.25


@dataclass
class StepContext:
    """What a method may use besides its params. Kept explicit so methods stay testable with tiny models."""

    device: str = "cpu"
    task: Any = None                       # acf.tasks.Task: calibration / training text from its train split
    teacher_dir: Optional[Path] = None     # uncompressed model, for distillation
    seed: int = 0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("acf.methods"))
    progress: Optional[Callable[[str, int, int], None]] = None   # (label, done, total)
    trust_remote_code: bool = False
    #: share (0..1) of calibration windows and kd_tune examples drawn from general text (other tasks' train splits)
    #: instead of the task's: holds the model on text other than the task's (kld_general); LoRA and distill ignore it
    calib_mix: float = DEFAULT_CALIB_MIX


MethodFn = Callable[[dict, Path, Path, StepContext], dict]


#: implementations run as steps without being declared methods (tests drive `run_strategy` with them); a declared
#: method's implementation is its MethodSpec.impl
UNDECLARED_IMPLS: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Run `target` ("module:function") for steps named `name` without declaring a method (no validation, search
    or card): for tests. Declare real methods with `acf.methods.registry.register(MethodSpec(...))`."""
    UNDECLARED_IMPLS[name] = target


def get_impl(name: str) -> MethodFn:
    import importlib

    from acf.methods.registry import get

    spec = get(name)
    target = spec.impl if spec is not None else UNDECLARED_IMPLS.get(name)
    if target is None:
        raise MethodFailed(name, "unavailable", f"no implementation registered for {name!r}")
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)
