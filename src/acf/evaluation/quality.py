"""Task-quality metrics: accuracy by batched greedy generation, and teacher-forced answer NLL."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from ..provenance import Measurement, device_string, runtime_string
from ..tasks import Item, Task
from .batching import auto_batch_size
from .generate import batched, generate_batch
from .stats import wilson_interval

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
            (len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=1) + max_new_tokens)
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))
    preds: dict[int, dict] = {}
    gen_tokens = 0
    for chunk in batched(order, batch_size):
        outs = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens,
                              done_pattern=getattr(task, "done_pattern", GSM8K_DONE),
                              stop_strings=task.stop_strings())
        for i, (text, n) in zip(chunk, outs):
            ok, got = task.score(text, items[i])
            gen_tokens += n
            preds[i] = {"id": items[i].id, "target": items[i].target, "extracted": got, "correct": bool(ok),
                        "completion": text, "new_tokens": n}
        if progress:
            progress(len(chunk))
    rows = [preds[i] for i in range(len(items))]
    k = sum(r["correct"] for r in rows)
    n = len(rows)
    secs = time.perf_counter() - t0
    m = Measurement(value=k / n if n else None, unit="fraction", device=device_string(device), runtime=runtime_string(),
                    n=n, seconds=round(secs, 3), ci95=wilson_interval(k, n),
                    method=f"greedy generation, batch {batch_size}, max {max_new_tokens} new tokens, "
                           f"{'chat template zero-shot' if fewshot == 0 else f'{fewshot}-shot plain prompt'}, exact match",
                    extra={"correct": k, "generated_tokens": gen_tokens})
    return m, rows


def answer_nll(model, tokenizer, task: Task, items: list[Item], *, batch_size: Optional[int] = 8, fewshot: int = 0,
               progress: Progress = None) -> Measurement:
    """Mean NLL per reference token given the prompt (token-weighted over all items), one forward per batch."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    eos = tokenizer.eos_token or ""
    seqs = []
    for it in items:
        p = tokenizer(task.chat_prompt(it, tokenizer, fewshot), add_special_tokens=False)["input_ids"]
        r = tokenizer(it.reference + (eos if fewshot == 0 else ""), add_special_tokens=False)["input_ids"]
        seqs.append((p, r))
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    if batch_size is None:
        batch_size = auto_batch_size(model, len(items), "score", max((len(p) + len(r) for p, r in seqs), default=1))
    total_nll, total_tok = 0.0, 0
    per_item: list[float] = [0.0] * len(seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for chunk in batched(order, batch_size):
        L = max(len(seqs[i][0]) + len(seqs[i][1]) for i in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        labels = torch.full((len(chunk), L), -100, dtype=torch.long)
        for row, i in enumerate(chunk):
            p, r = seqs[i]
            ids[row, :len(p) + len(r)] = torch.tensor(p + r)
            att[row, :len(p) + len(r)] = 1
            labels[row, len(p):len(p) + len(r)] = torch.tensor(r)
        ids, att, labels = ids.to(device), att.to(device), labels.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=att).logits.float()
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="none").view(len(chunk), -1)
        mask = (labels[:, 1:] != -100)
        for row, i in enumerate(chunk):
            s, c = lp[row][mask[row]].sum().item(), int(mask[row].sum().item())
            per_item[i] = s / max(c, 1)
            total_nll += s
            total_tok += c
        if progress:
            progress(len(chunk))
    value = total_nll / max(total_tok, 1)
    if not math.isfinite(value):
        value = float("inf")
    return Measurement(value=value, unit="nats/token", device=device_string(str(device)), runtime=runtime_string(),
                       n=len(items), seconds=round(time.perf_counter() - t0, 3),
                       method=f"teacher-forced mean NLL per reference token (token-weighted), batch {batch_size}",
                       extra={"tokens": total_tok, "item_mean": sum(per_item) / max(len(per_item), 1)})
