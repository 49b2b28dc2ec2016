"""llama.cpp as the measurement runtime of GGUF candidates (llama-cpp-python's bindings, CPU).

Everything a GGUF candidate reports is measured in llama.cpp on the file a user deploys:
- latency (batch-1 decode ms/token), ttft, throughput and memory on a deployment-like context (no per-position
  logits kept, n_ctx sized to the prompt and answer), after one warm-up;
- answer NLL, kld and top1 from llama.cpp's logits at every position (`logits_all=True`), fed the same token ids
  as the transformers path (acf.evaluation.sequences), and scored by the same code (`fidelity.teacher_forced`)
  against the same cached baseline reference: only the runtime that produces the logits differs;
- accuracy by greedy decoding in llama.cpp, scored by the task like the transformers path.

`LlamaCppLM` is written by hand because the teacher-forced pass asks a model for `model(input_ids,
attention_mask).logits`; the adapter answers that from llama.cpp one sequence at a time, so the KL and NLL code
(and its intervals) are shared, not duplicated.
"""

from __future__ import annotations

import functools
import os
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from acf.core.provenance import Measurement, device_string
from acf.core.instruments import PeakRSS

@functools.lru_cache(maxsize=None)
def gpu_offload() -> bool:
    """Whether GGUF candidates run on the GPU: when this llama.cpp build can offload (built with
    `LLAMA_CMAKE_ARGS=-DGGML_CUDA=on`, README) every layer goes to the GPU, as a user deploying on that machine
    would run it; `ACF_LLAMA_CPU=1` keeps llama.cpp on the CPU (the edge target measured on a GPU host)."""
    if os.environ.get("ACF_LLAMA_CPU", "").strip() not in ("", "0"):
        return False
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # an old binding without the query: CPU
        return False


def runtime_label() -> str:
    """What a Measurement names as its runtime for GGUF candidates: llama.cpp and its kernel path."""
    return "llama.cpp CUDA" if gpu_offload() else "llama.cpp CPU"


def threads() -> int:
    """llama.cpp's threads: this process's cores, or ACF_LLAMA_THREADS (on a machine shared with other jobs, threads
    equal to the cores spin at llama.cpp's barriers while another process holds a core: decode slowed ~10x here)."""
    env = os.environ.get("ACF_LLAMA_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except Exception:  # not every platform has sched_getaffinity
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def runtime_string() -> str:
    from importlib.metadata import version

    return f"{runtime_label()} (llama-cpp-python {version('llama_cpp_python')}, {threads()} threads)"


def cpu_string() -> str:
    """The device a GGUF measurement ran on (the CPU, or the GPU with every layer offloaded)."""
    import platform

    if gpu_offload():
        try:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "GPU"
        except Exception:  # torch without CUDA beside a CUDA llama.cpp build
            name = "GPU"
        return f"cuda ({name}, llama.cpp all layers offloaded)"
    try:
        cores = len(os.sched_getaffinity(0))
    except Exception:  # not every platform has sched_getaffinity
        cores = os.cpu_count() or 0
    return f"cpu ({platform.processor() or platform.machine()}, {cores} cores, llama.cpp {threads()} threads)"


def open_llama(path: str | Path, n_ctx: int, logits_all: bool):
    """A llama.cpp context: every layer on the GPU where the build offloads (`gpu_offload`), else on the CPU with
    this machine's cores as threads; no log output."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_ubatch=min(512, n_ctx),
                 n_threads=threads(), n_threads_batch=threads(), n_gpu_layers=-1 if gpu_offload() else 0,
                 logits_all=logits_all,
                 verbose=False)


def _last_logits(llm) -> "Any":
    import llama_cpp
    import numpy as np

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


class LlamaCppLM:
    """The slice of a transformers causal LM that `fidelity.teacher_forced` uses, answered by llama.cpp."""

    def __init__(self, path: str | Path, n_ctx: int):
        self.llm = open_llama(path, n_ctx, logits_all=True)
        self.n_ctx = n_ctx
        self._p = torch.zeros(1)

    def parameters(self):
        yield self._p            # device of the logits: the CPU

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: Any):
        B, L = input_ids.shape
        out = torch.zeros((B, L, self.llm.n_vocab()), dtype=torch.float32)
        for b in range(B):
            n = int(attention_mask[b].sum()) if attention_mask is not None else L
            if n > self.n_ctx:
                raise ValueError(f"sequence of {n} tokens exceeds the llama.cpp context of {self.n_ctx}")
            self.llm.reset()
            self.llm.eval(input_ids[b, :n].tolist())
            out[b, :n] = torch.from_numpy(self.llm.scores[:n].copy())
        return SimpleNamespace(logits=out)

    def close(self) -> None:
        self.llm.close()


def _greedy(llm, prompt: list[int], max_new: int, stop=None, eos: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Greedy decode in llama.cpp; returns new ids and the time after each eval (index 0: the prompt's)."""
    import numpy as np

    llm.reset()
    times = []
    t0 = time.perf_counter()
    llm.eval(prompt)
    times.append(time.perf_counter() - t0)
    new: list[int] = []
    for i in range(max_new):
        tok = int(np.argmax(_last_logits(llm)))
        new.append(tok)
        if tok in eos or (stop is not None and i % 4 == 3 and stop(new)):
            break
        if i == max_new - 1:
            break
        llm.eval([tok])
        times.append(time.perf_counter() - t0)
    return new, times


def latency(path: Path, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 3, n_ctx: int = 1024
            ) -> tuple[dict[str, Measurement], PeakRSS, Any]:
    """Batch-1 ttft and decode ms/token in llama.cpp (median of `repeats` after one warm-up), and batch-1 throughput.

    Returns the measurements, the RSS meter (over load + runs) and the open context (for reuse by accuracy)."""
    rss = PeakRSS()
    with rss:
        t = time.perf_counter()
        llm = open_llama(path, n_ctx, logits_all=False)
        load_s = time.perf_counter() - t
        _greedy(llm, prompt_ids, new_tokens)       # warm-up
        ttfts, decodes, totals = [], [], []
        for _ in range(repeats):
            new, times = _greedy(llm, prompt_ids, new_tokens)
            ttfts.append(times[0])
            decodes.append((times[-1] - times[0]) / max(len(times) - 1, 1))
            totals.append((len(new), times[-1]))
    dev, rt = cpu_string(), runtime_string()
    meth = (f"median of {repeats} after 1 warm-up, greedy (argmax of llama.cpp's logits), {new_tokens} new tokens, "
            f"prompt {len(prompt_ids)} tokens, n_ctx {n_ctx}")
    n_tok = sum(a for a, _ in totals)
    secs = sum(b for _, b in totals)
    out = {
        "latency": Measurement(value=statistics.median(decodes) * 1000, unit="ms/token", device=dev, runtime=rt,
                               n=repeats, method="batch-1 decode time per token: " + meth,
                               extra={"ttft_ms": statistics.median(ttfts) * 1000, "load_seconds": round(load_s, 3)}),
        "ttft": Measurement(value=statistics.median(ttfts) * 1000, unit="ms", device=dev, runtime=rt, n=repeats,
                            method="batch-1 time to first token (prompt evaluation): " + meth),
        "throughput": Measurement(value=n_tok / secs if secs else None, unit="tokens/s", device=dev, runtime=rt,
                                  n=repeats, method=f"batch 1 (llama-cpp-python runs one sequence per context): "
                                                    f"new tokens / wall time incl. prompt, {repeats} runs"),
    }
    return out, rss, llm


def gguf_params(path: Path) -> int:
    from acf.models.gguf_file import read_gguf

    return read_gguf(path).params


def evaluate_gguf(model_dir: Path, task, metrics: Sequence[str], *, limit: Optional[int], seed: Optional[int],
                  fewshot: int = 0, max_new_tokens: int = 256, accuracy_limit: Optional[int] = None,
                  latency_tokens: int = 32, item_offset: int = 0, fidelity=None, known_sparsity=None,
                  tokenizer=None, batch_size: Optional[int] = None, **_: Any):
    """`acf.evaluation.runner.evaluate` for a GGUF candidate directory: every metric measured in llama.cpp."""
    from acf.models.gguf_file import GGUF_NAME, load_manifest, read_gguf
    from acf.models.loading import load_tokenizer
    from acf.evaluation.fidelity import teacher_forced
    from acf.evaluation.shared import EvalResult, eval_items, measure_kld_general
    from acf.evaluation.sequences import task_sequences
    from acf.models.tokenization import encode_prompt

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    gpath = model_dir / GGUF_NAME
    man = load_manifest(model_dir)
    info = read_gguf(gpath)
    tok = tokenizer or load_tokenizer(model_dir)
    out: dict[str, Measurement] = {}
    preds: list[dict] = []
    if "size" in metrics:
        out["size"] = Measurement(value=float(info.size_bytes), unit="bytes", device="disk", runtime=runtime_label(),
                                  method=f"bytes of the GGUF file ({man.type}; it holds weights and tokenizer)",
                                  extra={"tensor_types": info.tensor_types})
    if "params" in metrics:
        out["params"] = Measurement(value=float(info.params), unit="count", device="disk",
                                    method="elements of all tensors in the GGUF (tied embeddings stored once)")
    if "bits_per_weight" in metrics:
        out["bits_per_weight"] = Measurement(value=round(info.size_bytes * 8 / max(info.params, 1), 4), unit="bits",
                                             device="disk", method="GGUF file bits (metadata, tokenizer and scales "
                                                                   "included) / tensor elements")
    if "sparsity" in metrics:
        out["sparsity"] = known_sparsity or Measurement(
            value=None, unit="fraction", device="disk", method="not measurable in a quantized GGUF; the pipeline "
                                                               "records what its pruning steps measured")
    quality = [m for m in metrics if m in task.metrics]
    forced = [m for m in ("answer_nll", "kld", "top1") if m in metrics]
    items = eval_items(task, limit, seed, item_offset) if (quality or forced) else None
    llm = None
    try:
        perf = [m for m in ("latency", "ttft", "throughput", "memory") if m in metrics]
        if perf or "accuracy" in quality:
            first = task.load("test", limit=1, seed=seed)[0]
            prompt_ids = encode_prompt(tok, task.chat_prompt(first, tok, fewshot))
            n_ctx = _round_up(max(len(prompt_ids) + latency_tokens,
                                  _max_prompt(task, tok, items, fewshot) + max_new_tokens) + 8, 256)
            lat, rss, llm = latency(gpath, prompt_ids, latency_tokens, n_ctx=n_ctx)
            for k in ("latency", "ttft", "throughput"):
                if k in metrics or k == "latency" and perf:
                    out[k] = lat[k]
            if "memory" in metrics and gpu_offload():
                # llama.cpp's CUDA buffers are outside torch's allocator and the process RSS; not measured yet
                out["memory"] = Measurement(value=None, unit="bytes", device=cpu_string(), runtime=runtime_string(),
                                            method="not measured: llama.cpp's GPU buffers are invisible to process "
                                                   "RSS and torch (ACF_LLAMA_CPU=1 measures the CPU deployment)")
            elif "memory" in metrics:
                out["memory"] = Measurement(value=float(rss.added), unit="bytes", device=cpu_string(),
                                            runtime=runtime_string(),
                                            method=f"peak process RSS increase (sampled every 5 ms) over llama.cpp "
                                                   f"load (mmap) + latency generation, n_ctx {n_ctx}",
                                            extra={"load_seconds": lat["latency"].extra.get("load_seconds")})
        if "accuracy" in quality:
            acc_items = items[:accuracy_limit] if accuracy_limit else items
            out["accuracy"], preds = _accuracy(llm, tok, task, acc_items, fewshot, max_new_tokens)
        if llm is not None:
            llm.close()
            llm = None
        if forced or "kld_general" in metrics:
            seqs = task_sequences(task, tok, items, fewshot) if forced else []
            longest = max([s.length for s in seqs] + [s.length for s in (fidelity.general_seqs if fidelity else [])]
                          + [1])
            lm = LlamaCppLM(gpath, _round_up(longest + 1, 256))
            try:
                if forced:
                    out.update(teacher_forced(lm, tok, seqs, forced, reference=fidelity.task if fidelity else None,
                                              batch_size=1, label=f"{task.name} test items"))
                if "kld_general" in metrics:
                    out["kld_general"] = measure_kld_general(lm, tok, fidelity, 1, None)
            finally:
                lm.close()
            for m in forced + (["kld_general"] if "kld_general" in metrics else []):
                if m in out and out[m].value is not None:
                    out[m].runtime = runtime_string()
                    out[m].device = cpu_string()
                    out[m].method += " (logits from llama.cpp, one sequence at a time)"
    finally:
        if llm is not None:
            llm.close()
    if items is not None:
        first_id = items[0].id if items else None
        for m in quality + forced:
            if m in out:
                out[m].extra.setdefault("items", {"offset": item_offset, "count": len(items), "first_id": first_id})
    for m in out.values():
        m.extra.setdefault("gguf_type", man.type)
    return EvalResult(model_path=str(model_dir), task=task.name, metrics=out, predictions=preds,
                      seconds=round(time.perf_counter() - t0, 3))


def _round_up(n: int, k: int) -> int:
    return ((n + k - 1) // k) * k


def _max_prompt(task, tok, items, fewshot: int) -> int:
    from acf.models.tokenization import encode_prompt

    if not items:
        return 0
    return max(len(encode_prompt(tok, task.chat_prompt(it, tok, fewshot))) for it in items)


def _eos_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set()
    vocab = tok.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if t in vocab:
            ids.add(vocab[t])
    return sorted(ids)


def _accuracy(llm, tok, task, items, fewshot: int, max_new_tokens: int):
    """Greedy generation in llama.cpp, scored by the task (the transformers path's rules: done pattern, stops)."""
    from acf.core.provenance import Measurement as M
    from acf.evaluation.quality import GSM8K_DONE
    from acf.models.tokenization import encode_prompt
    from acf.core.intervals import wilson_interval

    t0 = time.perf_counter()
    pat = re.compile(getattr(task, "done_pattern", GSM8K_DONE) or r"$^")
    stops = list(task.stop_strings())

    def stop(new: list[int]) -> bool:
        text = tok.decode(new[-96:], skip_special_tokens=True)
        return bool(pat.search(text)) or any(s in text for s in stops)

    eos = _eos_ids(tok)
    rows = []
    gen = 0
    for it in items:
        ids = encode_prompt(tok, task.chat_prompt(it, tok, fewshot))
        new, _ = _greedy(llm, ids, max_new_tokens, stop=stop, eos=eos)
        n = len(new)
        while n and new[n - 1] in eos:
            n -= 1
        text = tok.decode(new[:n], skip_special_tokens=True)
        ok, got = task.score(text, it)
        gen += n
        rows.append({"id": it.id, "target": it.target, "extracted": got, "correct": bool(ok), "completion": text,
                     "new_tokens": n})
    k = sum(r["correct"] for r in rows)
    n = len(rows)
    return M(value=k / n if n else None, unit="fraction", device=cpu_string(), runtime=runtime_string(), n=n,
             seconds=round(time.perf_counter() - t0, 3), ci95=wilson_interval(k, n),
             method=f"greedy generation in llama.cpp, one sequence at a time, max {max_new_tokens} new tokens, "
                    f"{'chat template zero-shot' if fewshot == 0 else f'{fewshot}-shot plain prompt'}, exact match",
             extra={"correct": k, "generated_tokens": gen}), rows
