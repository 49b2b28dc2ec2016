"""The `kld_general` text: a fixed mixture of text no recipe trains on, so damage outside the task shows.

Drawn from the test splits of the other shipped tasks (never the run's own task, whose train split calibrates and
trains recovery): TruthfulQA questions with their best answer, HumanEval prompts with the canonical solution,
CommonsenseQA questions with the gold answer, GSM8K questions with the reference solution. Plain text, no chat
template: it measures the model as a language model, the way llama.cpp's KL divergence runs on raw text.
A source whose data is not available here is left out (the Measurement lists the sources used).

The same sources' TRAIN splits give general *calibration* text (`general_train_texts`, for the `calib_mix` share of
calibration windows and kd_tune examples), so calibration holds the model on text other than the task's without
ever seeing an item kld_general scores: each source's train split is disjoint from its test split (see
`general_train_texts`).
"""

from __future__ import annotations

import logging
from typing import Optional

from acf.core.errors import AcfError, DataError
from acf.tasks import get_task

log = logging.getLogger(__name__)

SOURCES = ("truthfulqa", "humaneval", "commonsenseqa", "gsm8k")
PER_SOURCE = 24
#: the general text's own permutation seed (independent of the run's --seed, so every run scores the same text)
SEED = 4321


def general_texts(exclude_task: str, part: str = "search", per_source: int = PER_SOURCE) -> tuple[list[tuple[str, str]], list[str]]:
    """((id, text) pairs, sources used). `part` "search" takes the first `per_source` items of each source's
    permutation, "report" the next `per_source`: the final report never scores the text that ranked candidates."""
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
            out.append((f"{name}/{it.id}", render(it)))
    return out, used


def render(item) -> str:
    """An item as general text: prompt, newline, reference; plain (no template), as kld_general scores it."""
    return f"{item.prompt}\n{item.reference}".strip()


def general_train_pool(exclude_task: str, seed: int) -> tuple[list[tuple[str, str]], list[str]]:
    """((id, text) pairs, sources used): every train item of the other shipped tasks, interleaved round-robin across
    sources (each source in its own `seed` permutation), so any prefix is as balanced a mix as the sources' sizes
    allow; a source that runs out is skipped from then on. A source whose data is missing is left out.

    Never a kld_general item: every source's train split is disjoint from the test split `general_texts` draws
    from. gsm8k: train.jsonl vs test.jsonl (hub: train vs test). truthfulqa and humaneval (no train split
    upstream): items with index i % 8 == 7 vs the others. commonsenseqa: the last 221 dev items vs the first 1000,
    or, with train_rand_split.jsonl or from the hub, the train split vs the dev/validation split.
    """
    base = (exclude_task or "").partition(":")[0]
    per: list[list[tuple[str, str]]] = []
    used: list[str] = []
    for name in SOURCES:
        if name == base:
            continue
        try:
            items = get_task(name).load("train", limit=None, seed=seed)
        except AcfError as e:   # data not here: leave the source out, say so
            log.info("general calibration text: %s left out (%s)", name, e)
            continue
        if items:
            used.append(name)
            per.append([(f"{name}/{it.id}", render(it)) for it in items])
    out: list[tuple[str, str]] = []
    for i in range(max((len(p) for p in per), default=0)):
        out.extend(p[i] for p in per if i < len(p))
    return out, used


def general_train_texts(exclude_task: str, k: int, seed: int) -> list[str]:
    """The first `k` texts of `general_train_pool` (fewer when the pool is smaller): deterministic for
    (exclude_task, seed) and prefix-stable in k, as `Task.train_texts` is, so packing can ask for more texts
    without changing those already packed. Raises DataError when no source's train split is available."""
    pool, used = general_train_pool(exclude_task, seed)
    if not used:
        raise DataError(f"no general calibration text: none of the train splits of "
                        f"{', '.join(n for n in SOURCES if n != (exclude_task or '').partition(':')[0])} "
                        f"could be loaded (set ACF_DATA_DIR to a root holding those tasks' data)")
    return [t for _, t in pool[:k]]


def general_note(used: list[str], per_source: int = PER_SOURCE) -> Optional[str]:
    return f"{per_source} test items each of {', '.join(used)}" if used else None
