"""What every evaluation back end shares (acf.evaluation.backend: transformers; llama.cpp in llamacpp.py): the
evaluated items, the baseline references of fidelity metrics, the result record and the kld_general measurement."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from pydantic import BaseModel, Field

from acf.core.provenance import Measurement
from acf.evaluation.fidelity import Reference, build_reference, teacher_forced
from acf.evaluation.general_text import general_note, general_texts
from acf.evaluation.sequences import Scored, task_sequences, text_sequences
from acf.tasks import Task


@dataclass
class Fidelity:
    """The baseline references a fidelity measurement compares against (acf.evaluation.fidelity)."""

    task: Optional[Reference] = None          # on the task's evaluated items
    general: Optional[Reference] = None       # on the kld_general text
    general_seqs: list[Scored] = field(default_factory=list)
    general_sources: list[str] = field(default_factory=list)


def eval_items(task: Task, limit: Optional[int], seed: Optional[int], offset: int = 0) -> list:
    """The evaluated items: `limit` items from position `offset` of the test split's seeded permutation.

    Offset 0 is the search set (its first --proxy-limit items are the proxy set); the final report starts after
    it, so the items that rank candidates never produce the numbers a user quotes."""
    if not offset:
        return task.load("test", limit=limit, seed=seed)
    items = task.load("test", limit=None, seed=seed)[offset:]
    return items[:limit] if limit else items


def build_fidelity(model, tokenizer, task: Task, items: list, *, general: bool = True, general_part: str = "search",
                   batch_size: Optional[int] = None, model_name: str = "", cache=None) -> Fidelity:
    """References of the baseline (`model`) on `items` and, with `general`, on the kld_general text.

    `cache(name, seqs, build)` may return a cached reference (the pipeline keeps them in the run directory);
    `model` may be a function that loads the baseline, called only when a reference must be computed."""
    def get(name: str, seqs: list[Scored]) -> Reference:
        def build() -> Reference:
            m = model if isinstance(model, torch.nn.Module) else model()
            return build_reference(m, tokenizer, seqs, batch_size=batch_size, model_name=model_name)

        return cache(name, seqs, build) if cache else build()

    fid = Fidelity()
    seqs = task_sequences(task, tokenizer, items)
    fid.task = get(f"task-{general_part}", seqs)
    if general:
        texts, used = general_texts(task.name, general_part)
        fid.general_seqs = text_sequences(texts, tokenizer)
        fid.general_sources = used
        if fid.general_seqs:
            fid.general = get(f"general-{general_part}", fid.general_seqs)
    return fid


class EvalResult(BaseModel):
    model_path: str
    task: str
    metrics: dict[str, Measurement]
    predictions: list[dict] = Field(default_factory=list)
    seconds: float = 0.0

    def value(self, name: str) -> Optional[float]:
        m = self.metrics.get(name)
        return None if m is None else m.value


def measure_kld_general(model, tok, fidelity: Fidelity, batch_size, prog) -> Measurement:
    if fidelity.general is None or not fidelity.general_seqs:
        return Measurement(value=None, unit="nats/token", method="kld_general: no general text available here "
                                                                  "(none of the other tasks' data was found)")
    tid = prog.add_task("kld (general text)", total=len(fidelity.general_seqs)) if prog else None
    m = teacher_forced(model, tok, fidelity.general_seqs, ["kld"], reference=fidelity.general, batch_size=batch_size,
                       label=f"general text ({general_note(fidelity.general_sources)})",
                       progress=(lambda k: prog.advance(tid, k)) if prog else None)["kld"]
    m.extra["sources"] = fidelity.general_sources
    return m
