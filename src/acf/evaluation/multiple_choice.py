"""Batched log-likelihood scoring of multiple-choice items: log p(choice | prompt) for every choice.

Why this shape: on a small CPU model the cost is the number of tokens pushed through the network, not the
number of forward calls. Scoring each (prompt + choice) separately repeats the prompt once per choice (5x for
CommonsenseQA, ~10x for TruthfulQA MC2). Here the prompts of several items run in one left-padded forward
that keeps the KV cache, and then all choices of those items run in one second forward on top of the cached
prompts (the cache rows are gathered per choice). The vocabulary projection is only computed where a choice
token is predicted (`logits_to_keep`). A "flat" mode (batched prompt+choice sequences, sorted by length) is
kept for models whose cache cannot be re-indexed (sliding-window or recurrent layers) and as a cross-check.

Tokenisation follows lm-evaluation-harness: continuation tokens are `encode(prompt + choice)` minus the
tokens of `encode(prompt)`, no special tokens, so the numbers are comparable with `--backend lm-eval`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from acf.core.intervals import wilson_interval
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.evaluation.logits import chunk_positions, vocab_size
from acf.models.tokenization import adds_bos

Progress = Optional[Callable[[int], None]]

#: cap on (rows x continuation length) per second-stage forward: bounds the float32 logits (x vocab) in memory;
#: large vocabularies lower it further to acf.evaluation.logits.chunk_positions(vocab) (`_position_budget`)
MAX_CHOICE_TOKENS = 1024


@dataclass
class ChoiceScore:
    """Log-likelihood of one choice given its prompt."""

    logprob: float      # sum of log p(token) over the choice tokens
    tokens: int         # number of choice tokens
    chars: int          # characters of the answer, leading space excluded (lm-eval's acc_norm divisor)
    greedy: bool        # every choice token is the argmax (lm-eval's is_greedy)

    @property
    def norm(self) -> float:
        """Log-likelihood per character: removes the bias towards short answers that the plain sum has."""
        return self.logprob / max(self.chars, 1)


def _encode(tokenizer, prompt: str, choices: Sequence[str], max_len: int) -> tuple[list[int], list[list[int]]]:
    # lm-eval moves trailing whitespace of the prompt onto the continuation; do the same.
    stripped = prompt.rstrip(" ")
    if stripped != prompt:
        choices = [prompt[len(stripped):] + c for c in choices]
        prompt = stripped
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    conts = []
    for c in choices:
        whole = tokenizer(prompt + c, add_special_tokens=False)["input_ids"]
        cont = whole[len(p):] if whole[:len(p)] == p else tokenizer(c, add_special_tokens=False)["input_ids"]
        if not cont:  # an empty choice still needs one scored token to be comparable
            cont = tokenizer(c or " ", add_special_tokens=False)["input_ids"][-1:]
        conts.append(cont)
    longest = max(len(c) for c in conts)
    if adds_bos(tokenizer) and (not p or p[0] != tokenizer.bos_token_id):
        p = [tokenizer.bos_token_id] + p   # the one BOS rule (acf.models.tokenization)
    if not p:  # an empty prompt: condition on the end-of-text token, as lm-eval does
        p = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    if len(p) + longest > max_len:  # keep the end of the prompt (the question), drop the start (few-shot text)
        p = ([p[0]] + p[-(max_len - longest - 1):]) if adds_bos(tokenizer) else p[-(max_len - longest):]
    return p, conts


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _gather_scores(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of `targets` under `logits` [R, C, V] where `valid`, and whether all were greedy."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    tok_lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    greedy = (logits.argmax(-1) == targets) | ~valid
    return (tok_lp * valid).sum(-1), greedy.all(-1)


def _position_budget(model) -> int:
    """Scored positions one forward may return logits for: MAX_CHOICE_TOKENS, or fewer where the vocabulary is so
    large that their float32 logits would exceed acf.evaluation.logits.CHUNK_ELEMENTS (64 at 256k)."""
    return min(MAX_CHOICE_TOKENS, chunk_positions(vocab_size(model)))


def _max_len(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or 4096)


def score_choices(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], *, batch_size: int = 16,
                  mode: str = "shared", progress: Progress = None) -> list[list[ChoiceScore]]:
    """Score every choice of every (prompt, choices) request; one list of ChoiceScore per request, in order.

    `batch_size` is the number of prompts per forward (their choices go together in the second forward).
    `mode`: "shared" (prompt computed once, choices on its KV cache) or "flat" (prompt+choice sequences).
    "shared" falls back to "flat" for a model whose cache cannot be gathered by row.
    """
    if mode not in ("shared", "flat"):
        raise ValueError(f"mode must be 'shared' or 'flat', not {mode!r}")
    device = next(model.parameters()).device
    max_len = _max_len(model)
    enc = [_encode(tokenizer, p, list(cs), max_len) for p, cs in requests]
    out: list[list[ChoiceScore]] = [[] for _ in requests]
    # Longest prompts first: similar lengths share a batch and padding stays small.
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        scores = None
        if hasattr(model, "choice_logprobs"):
            # a back end's own choice scoring (acf.evaluation.backend: e.g. llama.cpp), on the same token ids
            scores = model.choice_logprobs([enc[i] for i in chunk])
        elif mode == "shared":
            try:
                scores = _score_shared(model, tokenizer, [enc[i] for i in chunk], device)
            except _CacheNotGatherable:
                mode = "flat"
        if scores is None:
            scores = _score_flat(model, tokenizer, [enc[i] for i in chunk], device, batch_size)
        for i, sc in zip(chunk, scores):
            # characters of the answer itself, without the separating space (lm-eval's acc_norm divisor)
            out[i] = [ChoiceScore(lp, len(c), len(ch.lstrip()) or len(ch), g)
                      for (lp, g), c, ch in zip(sc, enc[i][1], requests[i][1])]
        if progress:
            progress(len(chunk))
    return out


class _CacheNotGatherable(Exception):
    pass


def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, L - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, L - len(s):] = 1
    return ids.to(device), mask.to(device)


def _score_shared(model, tokenizer, enc: list[tuple[list[int], list[list[int]]]], device) -> list[list[tuple[float, bool]]]:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _left_pad([p for p, _ in enc], pad, device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                    logits_to_keep=1)
    cache = out.past_key_values
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise _CacheNotGatherable()
    kv = [(layer.keys, layer.values) for layer in layers]
    last = out.logits[:, -1]                      # predicts the first choice token
    plen = mask.sum(-1)
    rows = [(i, c) for i, (_, conts) in enumerate(enc) for c in conts]
    results: list[list[tuple[float, bool]]] = [[] for _ in enc]
    # Second stage in groups small enough that rows x tokens x vocab logits fit comfortably.
    C_all = max(len(c) for _, c in rows)
    group = max(1, _position_budget(model) // C_all)
    for g in range(0, len(rows), group):
        part = rows[g:g + group]
        idx = torch.tensor([i for i, _ in part], device=device)
        C = max(len(c) for _, c in part)
        cont = torch.full((len(part), C), pad, dtype=torch.long, device=device)
        cmask = torch.zeros((len(part), C), dtype=torch.long, device=device)
        for r, (_, c) in enumerate(part):
            cont[r, :len(c)] = torch.tensor(c, dtype=torch.long)
            cmask[r, :len(c)] = 1
        sub = DynamicCache(ddp_cache_data=[(k[idx], v[idx]) for k, v in kv])
        full_mask = torch.cat([mask[idx], cmask], dim=1)
        pos = plen[idx].unsqueeze(1) + torch.arange(C, device=device).unsqueeze(0)
        with torch.inference_mode():
            logits = model(input_ids=cont, attention_mask=full_mask, position_ids=pos, past_key_values=sub,
                           use_cache=True).logits
        logits = torch.cat([last[idx].unsqueeze(1), logits[:, :-1]], dim=1)
        lp, greedy = _gather_scores(logits, cont, cmask.bool())
        for r, (i, _) in enumerate(part):
            results[i].append((lp[r].item(), bool(greedy[r].item())))
    return results


def _score_flat(model, tokenizer, enc: list[tuple[list[int], list[list[int]]]], device,
                batch_size: int) -> list[list[tuple[float, bool]]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = sorted([(i, j, p + c, len(c)) for i, (p, conts) in enumerate(enc) for j, c in enumerate(conts)],
                  key=lambda r: -len(r[2]))
    results: dict[tuple[int, int], tuple[float, bool]] = {}
    budget = _position_budget(model)
    g = 0
    while g < len(rows):
        # rows x (C + 1) kept positions within the budget: bounded float32 logits for any vocabulary
        C = max(r[3] for r in rows[g:g + max(1, batch_size * 2)])
        per = max(1, min(batch_size * 2, budget // (C + 1)))
        part = rows[g:g + per]
        g += per
        ids, mask = _left_pad([r[2] for r in part], pad, device)
        C = max(r[3] for r in part)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                           logits_to_keep=C + 1).logits[:, :-1]          # [R, C, V]: predicts the last C tokens
        targets = ids[:, -C:]
        valid = torch.zeros_like(targets, dtype=torch.bool)
        for r, row in enumerate(part):
            valid[r, C - row[3]:] = True
        lp, greedy = _gather_scores(logits, targets, valid)
        for r, row in enumerate(part):
            results[(row[0], row[1])] = (lp[r].item(), bool(greedy[r].item()))
    return [[results[(i, j)] for j in range(len(conts))] for i, (_, conts) in enumerate(enc)]


def mc_measurements(scores: list[list[ChoiceScore]], gold: list[int], *, device: str, seconds: float,
                    batch_size: int, prompt_desc: str, mode: str = "shared") -> tuple[dict[str, Measurement], list[dict]]:
    """Accuracy (sum log-prob), accuracy_norm (per character) and answer NLL from choice scores.

    answer_nll is the token-weighted mean NLL of the gold choice text (nats/token), the same unit as the
    generic teacher-forced answer NLL, so it stays comparable across tasks.
    """
    n = len(scores)
    k = k_norm = 0
    nll = 0.0
    toks = 0
    preds = []
    for sc, g in zip(scores, gold):
        p = max(range(len(sc)), key=lambda j: sc[j].logprob)
        pn = max(range(len(sc)), key=lambda j: sc[j].norm)
        k += p == g
        k_norm += pn == g
        nll -= sc[g].logprob
        toks += sc[g].tokens
        preds.append({"pred": p, "pred_norm": pn, "target": g, "correct": p == g, "correct_norm": pn == g,
                      "logprobs": [round(s.logprob, 4) for s in sc]})
    common = dict(device=device_string(device), runtime=runtime_string(), n=n, seconds=round(seconds, 3))
    how = f"log-likelihood multiple choice ({mode} prompt, {batch_size} prompts/forward), {prompt_desc}"
    out = {
        "accuracy": Measurement(value=k / n if n else None, unit="fraction", ci95=wilson_interval(k, n),
                                method=how + "; argmax of summed choice log-prob", extra={"correct": k}, **common),
        "accuracy_norm": Measurement(value=k_norm / n if n else None, unit="fraction",
                                     ci95=wilson_interval(k_norm, n),
                                     method=how + "; argmax of log-prob per character of the choice",
                                     extra={"correct": k_norm}, **common),
        "answer_nll": Measurement(value=nll / max(toks, 1) if math.isfinite(nll) else float("inf"),
                                  unit="nats/token",
                                  method=how + "; token-weighted mean NLL of the correct choice text",
                                  extra={"tokens": toks}, **common),
    }
    return out, preds


def evaluate_mc(model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], gold: list[int], *,
                batch_size: int = 16, prompt_desc: str = "", mode: str = "shared",
                progress: Progress = None) -> tuple[dict[str, Measurement], list[dict]]:
    """Score and summarise: {accuracy, accuracy_norm, answer_nll} Measurements and per-item predictions."""
    device = str(next(model.parameters()).device)
    t0 = time.perf_counter()
    scores = score_choices(model, tokenizer, requests, batch_size=batch_size, mode=mode, progress=progress)
    return mc_measurements(scores, gold, device=device, seconds=time.perf_counter() - t0, batch_size=batch_size,
                           prompt_desc=prompt_desc, mode=mode)
