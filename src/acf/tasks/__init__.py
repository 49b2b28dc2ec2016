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


def get_task(name: str, data_dir: Optional[str] = None, allow_code_execution: bool = False, *,
             train_share: Optional[float] = None, scorer: Optional[str] = None) -> Task:
    """Build a task by name; `name:sub` selects a subtask where the task has them (e.g. bbh:date_understanding).
    A name that is a path (`acf.tasks.own_data.is_dataset_file`) is the user's own .jsonl/.csv file, read and
    checked now (`acf.tasks.custom`), so a bad row stops the command before any model loads.

    `allow_code_execution` is the user's consent (--allow-code-execution) for tasks scored by running
    model-written code (humaneval); other tasks ignore it. `train_share` and `scorer` belong to a file's task.
    """
    import importlib

    from acf.tasks.own_data import is_dataset_file

    if is_dataset_file(name or ""):
        if data_dir:
            raise DataError(f"--data-dir is a built-in task's folder; --dataset {name} is a file read as given: "
                            f"drop --data-dir")
        from acf.tasks.custom import CustomTask

        return CustomTask(name, train_share=train_share, scorer=scorer)
    if train_share is not None or scorer is not None:
        given = " and ".join(f for f, v in (("--train-share", train_share), ("--scorer", scorer)) if v is not None)
        raise DataError(f"{given} apply to your own data (--dataset FILE.jsonl|FILE.csv), not to the built-in "
                        f"task {name!r}")
    base, _, sub = (name or "").partition(":")
    if base not in _REGISTRY:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(task_names())}, or give a .jsonl/.csv "
                        f"file of your own")
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
