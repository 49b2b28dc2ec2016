"""Shared machinery for tasks scored by log-likelihood multiple choice (CommonsenseQA, TruthfulQA)."""

from __future__ import annotations

from typing import Any

from acf.core.errors import AcfError
from acf.tasks.base import Item, Task


class MultipleChoiceTask(Task):
    """A task whose items carry `choices` and a gold index in `target`; scored by choice log-likelihood.

    All MC metrics come from one scoring pass, so `evaluate_metrics` computes them together.
    """

    metrics: tuple[str, ...] = ("accuracy", "accuracy_norm", "answer_nll")
    task_metrics: tuple[str, ...] = ("accuracy", "accuracy_norm", "answer_nll")
    #: what the prompt looks like, for the Measurement's method string
    prompt_desc: str = ""

    def context(self, item: Item) -> str:
        """The text the choices are appended to (plain, no chat template: the choice must directly follow it)."""
        return self.plain_prompt(item)

    def continuations(self, item: Item) -> list[str]:
        return [" " + c for c in item.choices]

    def progress_units(self, names: list[str], n_items: int) -> int:
        return n_items                                   # one scoring pass for all MC metrics

    def evaluate_metrics(self, names: list[str], model, tokenizer, items: list[Item], batch_size: int = 8,
                         progress=None) -> tuple[dict[str, Any], list[dict]]:
        from acf.evaluation.multiple_choice import evaluate_mc

        bad = [n for n in names if n not in self.task_metrics]
        if bad:
            raise AcfError(f"task {self.name} does not offer metric(s) {', '.join(bad)} "
                           f"(it offers {', '.join(self.task_metrics)})")
        reqs = [(self.context(it), self.continuations(it)) for it in items]
        res, preds = evaluate_mc(model, tokenizer, reqs, [int(it.target) for it in items], batch_size=batch_size,
                                 prompt_desc=self.prompt_desc, progress=progress)
        for it, p in zip(items, preds):
            p["id"] = it.id
        return {n: res[n] for n in names}, preds

    def evaluate_metric(self, name: str, model, tokenizer, items: list[Item], batch_size: int = 8,
                        progress=None) -> tuple[Any, list[dict]]:
        res, preds = self.evaluate_metrics([name], model, tokenizer, items, batch_size=batch_size, progress=progress)
        return res[name], preds

    def instruction(self, item: Item) -> str:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(item.choices[:26]))
        return f"{item.prompt}\n{opts}\nAnswer with the letter of the correct option."
