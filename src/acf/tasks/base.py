"""The task interface. A task knows its data, its prompts, its scoring and its metrics; evaluation is generic."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Item:
    id: str
    prompt: str                      # the question as the user would ask it (no template applied)
    reference: str                   # reference completion (answer NLL is computed on it)
    target: Any = None               # what a prediction must match (number, label, ...)
    choices: list[str] = field(default_factory=list)   # multiple-choice tasks
    meta: dict = field(default_factory=dict)


class Task(ABC):
    name: str = ""
    hub_id: str = ""
    #: metrics this task can compute (the pipeline's objectives must be among these or the model metrics)
    metrics: tuple[str, ...] = ("answer_nll",)
    #: how the headline quality metric is named in reports
    quality_metric: str = "accuracy"
    #: metrics this task computes itself through `evaluate_metric(s)`; the others (GSM8K's generation accuracy
    #: and teacher-forced answer NLL) go through the generic paths in `acf.evaluation.quality`
    task_metrics: tuple[str, ...] = ()

    def __init__(self, data_dir: Optional[str] = None, subtask: Optional[str] = None):
        self.data_dir = data_dir
        self.subtask = subtask

    @abstractmethod
    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        """Items of a split; deterministic for a given (limit, seed)."""

    @abstractmethod
    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        """Plain texts (prompt + reference) from the training split for calibration and recovery training."""

    def chat_prompt(self, item: Item, tokenizer, fewshot: int = 0) -> str:
        """The string fed to the model for generation/NLL: chat template zero-shot when the tokenizer has one."""
        if fewshot == 0 and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": self.instruction(item)}],
                                                 tokenize=False, add_generation_prompt=True)
        return self.plain_prompt(item, fewshot)

    def instruction(self, item: Item) -> str:
        return item.prompt

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        return f"Question: {item.prompt}\nAnswer:"

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        """(correct, extracted answer) for a generated completion."""
        raise NotImplementedError(f"task {self.name} is not scored by generation")

    def stop_strings(self) -> list[str]:
        return []

    def evaluate_metric(self, name: str, model, tokenizer, items: list[Item], batch_size: int = 8,
                        progress=None) -> tuple[Any, list[dict]]:
        """(Measurement, per-item predictions) for one of `task_metrics`."""
        raise NotImplementedError(f"task {self.name} does not compute metric {name!r} itself")

    def progress_units(self, names: list[str], n_items: int) -> int:
        """How many progress steps `evaluate_metrics(names)` reports (one per item per separate pass)."""
        return n_items * len(names)

    def evaluate_metrics(self, names: list[str], model, tokenizer, items: list[Item], batch_size: int = 8,
                         progress=None) -> tuple[dict[str, Any], list[dict]]:
        """Several task metrics at once. Tasks whose metrics share one scoring pass (multiple choice) override
        this so that accuracy, accuracy_norm and answer NLL cost one pass, not three."""
        out: dict[str, Any] = {}
        preds: list[dict] = []
        for n in names:
            out[n], p = self.evaluate_metric(n, model, tokenizer, items, batch_size=batch_size, progress=progress)
            preds = preds or p
        return out, preds
