"""Tasks: how items load, how prompts are built, how answers are scored, and text for calibration/training."""

from __future__ import annotations

from typing import Optional

from ..errors import DataError
from .base import Item, Task

_REGISTRY: dict[str, str] = {
    "gsm8k": "acf.tasks.gsm8k:GSM8K",
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def get_task(name: str, data_dir: Optional[str] = None) -> Task:
    """Build a task by name; `name:sub` selects a subtask where the task has them (e.g. bbh:date_understanding)."""
    import importlib

    base, _, sub = (name or "").partition(":")
    if base not in _REGISTRY:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")
    mod, _, cls = _REGISTRY[base].partition(":")
    klass = getattr(importlib.import_module(mod), cls)
    return klass(data_dir=data_dir, subtask=sub or None)


__all__ = ["Item", "Task", "get_task", "task_names", "register"]
