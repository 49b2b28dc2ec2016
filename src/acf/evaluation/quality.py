"""Task-quality metrics: accuracy by batched greedy generation, and teacher-forced answer NLL."""

from __future__ import annotations

import time
from typing import Callable, Optional

from acf.core.intervals import wilson_interval
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.evaluation.batching import auto_batch_size
from acf.evaluation.fidelity import teacher_forced
from acf.evaluation.generate import generate_all
from acf.evaluation.sequences import task_sequences
from acf.tasks import Item, Task

Progress = Optional[Callable[[int], None]]
#: a GSM8K answer is complete once a newline follows its number; end of text is not enough, because numbers are
#: tokenized digit by digit and the check between two digits would cut "#### 1842" to "#### 1"
GSM8K_DONE = r"####\s*\$?-?[\d,]+(?:\.\d+)?[ \t]*\n"


def accuracy(model, tokenizer, task: Task, items: list[Item], *, batch_size: Optional[int] = 8,
             max_new_tokens: int = 256, fewshot: int = 0, progress: Progress = None) -> tuple[Measurement, list[dict]]:
    """Greedy generation accuracy; `batch_size=None` sizes the batch from free GPU memory (acf.evaluation.batching)."""
    device = str(next(model.parameters()).device)
    t0 = time.perf_counter()
    prompts = [task.chat_prompt(it, tokenizer, fewshot) for it in items]
    if batch_size is None:
        batch_size = auto_batch_size(model, len(items), "generate", lambda: max(
            (len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=1) + max_new_tokens,
            new_tokens=max_new_tokens)
    outs, engine = generate_all(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                                done_pattern=getattr(task, "done_pattern", GSM8K_DONE),
                                stop_strings=task.stop_strings(), progress=progress)
    preds: dict[int, dict] = {}
    gen_tokens = 0
    for i, (text, n) in enumerate(outs):
        ok, got = task.score(text, items[i])
        gen_tokens += n
        preds[i] = {"id": items[i].id, "target": items[i].target, "extracted": got, "correct": bool(ok),
                    "completion": text, "new_tokens": n}
    rows = [preds[i] for i in range(len(items))]
    k = sum(r["correct"] for r in rows)
    n = len(rows)
    secs = time.perf_counter() - t0
    m = Measurement(value=k / n if n else None, unit="fraction", device=device_string(device), runtime=runtime_string(),
                    n=n, seconds=round(secs, 3), ci95=wilson_interval(k, n),
                    method=f"greedy generation ({engine}), max {max_new_tokens} new tokens, "
                           f"{'chat template zero-shot' if fewshot == 0 else f'{fewshot}-shot plain prompt'}, exact match",
                    extra={"correct": k, "generated_tokens": gen_tokens, "engine": engine,
                           "generated_tokens_per_s": round(gen_tokens / secs, 1) if secs > 0 else None})
    return m, rows


def answer_nll(model, tokenizer, task: Task, items: list[Item], *, batch_size: Optional[int] = 8, fewshot: int = 0,
               progress: Progress = None) -> Measurement:
    """Mean NLL per reference token given the prompt (token-weighted over all items), one forward per batch.

    The same teacher-forced pass as kld/top1 (acf.evaluation.fidelity), on the same sequences."""
    seqs = task_sequences(task, tokenizer, items, fewshot)
    return teacher_forced(model, tokenizer, seqs, ["answer_nll"], batch_size=batch_size, progress=progress)["answer_nll"]
