"""The `kld_general` text: a fixed mixture of text no recipe trains on, so damage outside the task shows.

Drawn from the test splits of the other shipped tasks (never the run's own task, whose train split calibrates and
trains recovery): TruthfulQA questions with their best answer, HumanEval prompts with the canonical solution,
CommonsenseQA questions with the gold answer, GSM8K questions with the reference solution. Plain text, no chat
template: it measures the model as a language model, the way llama.cpp's KL divergence runs on raw text.
A source whose data is not available here is left out (the Measurement lists the sources used).
"""

from __future__ import annotations

import logging
from typing import Optional

from acf.core.errors import AcfError

log = logging.getLogger(__name__)

SOURCES = ("truthfulqa", "humaneval", "commonsenseqa", "gsm8k")
PER_SOURCE = 24
#: the general text's own permutation seed (independent of the run's --seed, so every run scores the same text)
SEED = 4321


def general_texts(exclude_task: str, part: str = "search", per_source: int = PER_SOURCE) -> tuple[list[tuple[str, str]], list[str]]:
    """((id, text) pairs, sources used). `part` "search" takes the first `per_source` items of each source's
    permutation, "report" the next `per_source`: the final report never scores the text that ranked candidates."""
    from acf.tasks import get_task

    base = (exclude_task or "").partition(":")[0]
    start = 0 if part == "search" else per_source
    out: list[tuple[str, str]] = []
    used: list[str] = []
    for name in SOURCES:
        if name == base:
            continue
        try:
            items = get_task(name).load("test", limit=None, seed=SEED)[start:start + per_source]
        except AcfError as e:   # data not here: leave the source out, say so
            log.info("kld_general: %s left out (%s)", name, e)
            continue
        if not items:
            continue
        used.append(name)
        for it in items:
            out.append((f"{name}/{it.id}", f"{it.prompt}\n{it.reference}".strip()))
    return out, used


def general_note(used: list[str], per_source: int = PER_SOURCE) -> Optional[str]:
    return f"{per_source} test items each of {', '.join(used)}" if used else None
