"""Batched greedy generation that stops as soon as every sequence has finished its answer."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Callable, Optional, Sequence

import torch

from acf.core.errors import AcfError
from acf.evaluation.gqa_attention import use_for_generation
from acf.models.tokenization import prompt_text

log = logging.getLogger(__name__)

#: the GPU's generation engine unless ACF_GEN_ENGINE says otherwise: padded batches sized from free memory measured
#: fastest of the engines transformers offers here (Llama-3.1-8B shape, 400 GSM8K prompts x 256 new tokens: H100
#: 1863 tok/s padded vs 1516 continuous batching vs 804 static cache + compile; H200 2521 vs 1491;
#: experiments/results/scale-gpu-acf-8b-gen*.json), and 7870-8022 tok/s on an H100 once grouped-query attention
#: was folded, cuDNN attention excluded and the batch sized by the real peak (scale-gpu-acf-8b-gen-gqa.json)
DEFAULT_ENGINE = "padded"
ENGINES = ("padded", "continuous", "static", "vllm")


class AnswerDone:
    """Per-sequence stopping: a sequence is done when its new text matches `done_pattern` or a stop string.

    transformers accepts a BoolTensor of shape (batch,) from a stopping criterion and finishes those rows only,
    so a batch ends when its slowest row has answered rather than at max_new_tokens.

    The check runs on the host while the GPU waits, so it decodes only rows still running and only their last
    `window` new tokens (a match is at most a few dozen tokens long and earlier text was checked before):
    decoding every row's whole continuation every few steps cost ~25% of generation time at batch 386.
    """

    def __init__(self, tokenizer, prompt_len: int, done_pattern: Optional[str], stop_strings: Sequence[str] = (),
                 every: int = 4, window: int = 96):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.pattern = re.compile(done_pattern) if done_pattern else None
        self.stops = list(stop_strings)
        self.every = every
        self.window = window
        self.done: Optional[torch.Tensor] = None

    def matches(self, text: str) -> bool:
        """The row has answered: its recent text shows the done pattern or a stop string."""
        return bool(self.pattern and self.pattern.search(text)) or any(s in text for s in self.stops)

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        if n_new % self.every == 0 and n_new > 0 and (self.pattern or self.stops):
            todo = (~self.done).nonzero().flatten()
            if len(todo):
                start = max(self.prompt_len, input_ids.shape[1] - self.window)
                texts = self.tok.batch_decode(input_ids[todo, start:], skip_special_tokens=True)
                hit = [i for i, t in zip(todo.tolist(), texts) if self.matches(t)]
                if hit:
                    self.done[hit] = True
        return self.done.clone()


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                   done_pattern: Optional[str] = None, stop_strings: Sequence[str] = (),
                   static_cache: bool = False) -> list[tuple[str, int]]:
    """Greedy completions for a batch of already-templated prompts: [(text, n_new_tokens)]."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([prompt_text(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = old_side
    plen = enc["input_ids"].shape[1]
    crit = AnswerDone(tokenizer, plen, done_pattern, stop_strings)
    eos = _eos_ids(model, tokenizer)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, stopping_criteria=StoppingCriteriaList([crit]),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                             **({"cache_implementation": "static"} if static_cache else {}))
    new = out[:, plen:]
    results = []
    for row in new:
        ids = row.tolist()
        n = len(ids)
        while n and ids[n - 1] == tokenizer.pad_token_id:
            n -= 1
        results.append((tokenizer.decode(ids[:n], skip_special_tokens=True), n))
    return results


def generate_all(model, tokenizer, prompts: list[str], max_new_tokens: int, *, batch_size: int,
                 done_pattern: Optional[str] = None, stop_strings: Sequence[str] = (),
                 progress: Optional["ProgressFn"] = None) -> tuple[list[tuple[str, int]], str]:
    """Greedy completions of every prompt, in order, and the engine that made them (for the Measurement).

    ACF_GEN_ENGINE picks the GPU's engine (default DEFAULT_ENGINE): `padded` — batches of `batch_size` longest-first
    with per-row stopping (`generate_batch` below); `static` — the same with a static KV cache, which transformers
    compiles; `continuous` — transformers' continuous batching (`generate_batch`: paged KV cache, a finished
    sequence's slot refilled at once; padded batches if it fails); `vllm` — where vLLM is installed (it serves
    compressed-tensors checkpoints with its own kernels; it loads the checkpoint a second time, and no machine acf
    was measured on had it). The CPU always uses padded batches. Continuous batching cannot stop a row on a
    pattern, so each completion is cut where `AnswerDone` would have stopped it (the same check at the same token
    counts): both engines return the same text for the same greedy tokens. Measured on the GPU in
    experiments/bench_scale.py (SPEC.md has the figures)."""
    if hasattr(model, "complete"):
        # a back end's own generation (acf.evaluation.backend: e.g. llama.cpp), under the same stopping rules
        return model.complete(tokenizer, prompts, max_new_tokens, done_pattern=done_pattern,
                              stop_strings=stop_strings, progress=progress)
    device = next(model.parameters()).device
    engine = os.environ.get("ACF_GEN_ENGINE", DEFAULT_ENGINE)
    if engine not in ENGINES:
        raise AcfError(f"ACF_GEN_ENGINE={engine!r}: one of {', '.join(ENGINES)}")
    if device.type == "cuda" and engine == "vllm":
        outs = _vllm(model, tokenizer, prompts, max_new_tokens, done_pattern, stop_strings)
        if progress:
            progress(len(prompts))
        return outs, "vLLM (its own load of the same checkpoint)"
    if device.type == "cuda" and engine == "continuous":
        try:
            outs = _continuous(model, tokenizer, prompts, max_new_tokens, done_pattern, stop_strings)
            if progress:
                progress(len(prompts))
            return outs, "transformers continuous batching (paged KV cache)"
        except Exception as e:  # noqa: BLE001 - an architecture or format the engine does not take: padded batches
            log.warning("continuous batching failed (%s: %s); generating in padded batches", type(e).__name__, e)
    static = device.type == "cuda" and engine == "static"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))   # similar lengths waste less padding
    res: dict[int, tuple[str, int]] = {}
    # grouped-query attention without per-head KV copies under the padding mask (gqa_attention); ACF_GQA_FOLD=0
    # keeps transformers' sdpa path (for before/after measurements)
    prev = use_for_generation(model) if os.environ.get("ACF_GQA_FOLD", "1") != "0" else None
    # cuDNN's attention builds an execution plan for every new input shape, and every decode step brings a new key
    # length: on an H100 (Llama-3.1-8B shape, 400 prompts x 256 tokens) a first generation took 33.1 s with cuDNN
    # allowed and 16.8 s without, repeated calls 14.8 vs 14.3 s (experiments/results/gen-backends-h100.json).
    # ACF_GEN_CUDNN_SDPA=1 allows it again (for before/after measurements).
    no_cudnn = device.type == "cuda" and os.environ.get("ACF_GEN_CUDNN_SDPA", "0") != "1"
    first = max(1, batch_size)
    bs, todo = first, order
    try:
        with _sdpa_without_cudnn() if no_cudnn else contextlib.nullcontext():
            while todo:
                chunk = todo[:bs]
                try:
                    outs = generate_batch(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens,
                                          done_pattern=done_pattern, stop_strings=stop_strings, static_cache=static)
                except torch.OutOfMemoryError:
                    # the batch estimate (acf.evaluation.batching) is a plan, not a guarantee: halve and go on
                    # rather than lose the candidate's evaluation; a single row that does not fit is a real failure
                    if bs == 1:
                        raise
                    bs = max(1, bs // 2)
                    torch.cuda.empty_cache()
                    log.warning("generation ran out of GPU memory at batch %d; going on with batches of %d",
                                len(chunk), bs)
                    continue
                for i, o in zip(chunk, outs):
                    res[i] = o
                todo = todo[len(chunk):]
                if progress:
                    progress(len(chunk))
    finally:
        if prev is not None:
            model.set_attn_implementation(prev)
    how = "static KV cache + torch.compile, " if static else ""
    how += "grouped-query attention folded, " if prev is not None else ""
    how += "cuDNN attention off, " if no_cudnn else ""
    sizes = f"{first}" if bs == first else f"{first}, then {bs} after running out of GPU memory"
    return [res[i] for i in range(len(prompts))], f"transformers generate, {how}padded batches of {sizes}"


def _sdpa_without_cudnn():
    """torch's scaled_dot_product_attention may pick any backend but cuDNN's, inside this context only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _continuous(model, tokenizer, prompts: list[str], max_new_tokens: int, done_pattern: Optional[str],
                stop_strings: Sequence[str]) -> list[tuple[str, int]]:
    from transformers import GenerationConfig

    ids = _encode(tokenizer, prompts)
    eos = _eos_ids(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
    # no inference_mode here: the engine's worker thread resets tensors made in this call (no_grad is its own)
    res = model.generate_batch(ids, generation_config=cfg, progress_bar=False)
    outs = list(res.values())
    bad = [o.request_id for o in outs if o.error is not None]
    if len(outs) != len(prompts) or bad:
        raise RuntimeError(f"{len(prompts) - len(outs)} requests missing, {len(bad)} failed")
    return _finish(tokenizer, [list(o.generated_tokens) for o in outs], done_pattern, stop_strings)


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt token ids as the padded engine encodes them (no special tokens added beyond the rendered prompt)."""
    return [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]


def _finish(tokenizer, gens: list[list[int]], done_pattern: Optional[str],
            stop_strings: Sequence[str]) -> list[tuple[str, int]]:
    """Completions of an engine that runs rows to end-of-sequence, cut where the padded engine would stop them."""
    crit = AnswerDone(tokenizer, 0, done_pattern, stop_strings)
    results = []
    for gen in gens:
        n = cut_point(crit, gen)
        while n and gen[n - 1] == tokenizer.pad_token_id:
            n -= 1
        results.append((tokenizer.decode(gen[:n], skip_special_tokens=True), n))
    return results


def _vllm(model, tokenizer, prompts: list[str], max_new_tokens: int, done_pattern: Optional[str],
          stop_strings: Sequence[str]) -> list[tuple[str, int]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise AcfError("ACF_GEN_ENGINE=vllm, but vLLM is not installed (pip install vllm), or unset it") from None
    path = getattr(model.config, "_name_or_path", "")
    if not path:
        raise AcfError("ACF_GEN_ENGINE=vllm needs the model's checkpoint folder; this model was not loaded from one")
    free_b, total = torch.cuda.mem_get_info()
    llm = LLM(model=path, tokenizer=path, gpu_memory_utilization=round(0.85 * free_b / total, 3),
              trust_remote_code=False)
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=_eos_ids(model, tokenizer))
        # token ids, encoded as every other engine encodes them (a text prompt would get vLLM's own special tokens)
        res = llm.generate([{"prompt_token_ids": x} for x in _encode(tokenizer, prompts)], sp, use_tqdm=False)
    finally:
        del llm
        torch.cuda.empty_cache()
    return _finish(tokenizer, [list(r.outputs[0].token_ids) for r in res], done_pattern, stop_strings)


def cut_point(crit: AnswerDone, gen: list[int]) -> int:
    """How many of `gen` the padded engine keeps: up to the first check (every `crit.every` new tokens, on the last
    `crit.window`) that finds the done pattern or a stop string, or up to the first end-of-sequence token."""
    n = len(gen)
    if crit.pattern or crit.stops:
        for k in range(crit.every, n + 1, crit.every):
            if crit.matches(crit.tok.decode(gen[max(0, k - crit.window):k], skip_special_tokens=True)):
                return k
    return n


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(t) if t in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(ids)


def batched(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


ProgressFn = Callable[[int], None]
