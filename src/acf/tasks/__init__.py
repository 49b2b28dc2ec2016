"""Tasks: how items load, how prompts are built, how answers are scored, and text for calibration/training."""

from __future__ import annotations

from typing import Optional

from acf.core.errors import DataError
from acf.tasks.base import Item, Task

_REGISTRY: dict[str, str] = {
    "gsm8k": "acf.tasks.gsm8k:GSM8K",
    "commonsenseqa": "acf.tasks.commonsenseqa:CommonsenseQA",
    "truthfulqa": "acf.tasks.truthfulqa:TruthfulQA",
    "bbh": "acf.tasks.bbh:BBH",
    "humaneval": "acf.tasks.humaneval:HumanEval",
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def get_task(name: str, data_dir: Optional[str] = None, allow_code_execution: bool = False) -> Task:
    """Build a task by name; `name:sub` selects a subtask where the task has them (e.g. bbh:date_understanding).

    `allow_code_execution` is the user's consent (--allow-code-execution) for tasks scored by running
    model-written code (humaneval); other tasks ignore it.
    """
    import importlib

    base, _, sub = (name or "").partition(":")
    if base not in _REGISTRY:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(task_names())}")
    mod, _, cls = _REGISTRY[base].partition(":")
    klass = getattr(importlib.import_module(mod), cls)
    if sub and base not in _SUBTASKS:
        raise DataError(f"task {base!r} has no subtasks (got {name!r})")
    task = klass(data_dir=data_dir, subtask=sub or None)
    if hasattr(task, "allow_code_execution"):
        task.allow_code_execution = bool(allow_code_execution)
    return task


#: tasks that accept `name:subtask`
_SUBTASKS = {"bbh"}


__all__ = ["Item", "Task", "get_task", "task_names", "register"]
