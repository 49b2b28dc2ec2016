"""llama.cpp as the measurement runtime of GGUF candidates (llama-cpp-python's bindings, CPU): the llama.cpp
implementation of the evaluation back-end protocol (acf.evaluation.backend), `LlamaCppBackend`.

Everything a GGUF candidate reports is measured in llama.cpp on the file a user deploys, and dispatched by the same
evaluator as a transformers candidate (acf.evaluation.runner.evaluate), so both report the same metrics with the
same meaning:
- latency (batch-1 decode ms/token), ttft, throughput and memory on a deployment-like context (no per-position
  logits kept, n_ctx sized to the prompt and answer), after one warm-up;
- answer NLL, kld and top1 from llama.cpp's logits at every position (`logits_all=True`), fed the same token ids
  as the transformers path (acf.evaluation.sequences), and scored by the same code (`fidelity.teacher_forced`)
  against the same cached baseline reference: only the runtime that produces the logits differs;
- multiple-choice metrics (accuracy, accuracy_norm, mc1, mc2 and the gold choice's NLL) from llama.cpp's choice
  log-likelihoods, scored by the task's own code (`LlamaCppLM.choice_logprobs`);
- generation metrics (accuracy, pass@1) by greedy decoding in llama.cpp (`LlamaCppLM.complete`), scored by the
  task like the transformers path.

`LlamaCppLM` is written by hand because the measurement code asks a model for `model(input_ids,
attention_mask).logits`; the adapter answers that from llama.cpp one sequence at a time, so the KL, NLL and
multiple-choice code (and its intervals) are shared, not duplicated.
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

from acf.core.provenance import Measurement
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
    """The model handle of the llama.cpp back end: the three primitives acf's measurement code asks of a model.

    - teacher-forced logits: `lm(input_ids, attention_mask).logits` (the slice of a transformers causal LM that
      `fidelity.teacher_forced` uses), from a `logits_all` context, one sequence at a time;
    - choice log-likelihoods: `choice_logprobs` (used by `multiple_choice.score_choices`): each prompt evaluated
      once, each choice on top of its KV cache;
    - greedy generation: `complete` (used by `generate.generate_all`), on a context without per-position logits.
    Contexts are opened on first use and reopened larger when a longer sequence comes."""

    def __init__(self, path: str | Path, n_ctx: int):
        self.path = Path(path)
        self.llm = open_llama(path, n_ctx, logits_all=True)
        self.n_ctx = n_ctx
        self._gen = None
        self._gen_ctx = 0
        self._p = torch.zeros(1)

    def parameters(self):
        yield self._p            # device of the logits: the CPU

    def reserve(self, n_tokens: int) -> None:
        """Make the logits context hold `n_tokens` (rounded up to 256; reopened only when it must grow)."""
        n_ctx = _round_up(n_tokens + 1, 256)
        if n_ctx > self.n_ctx:
            self.llm.close()
            self.llm = open_llama(self.path, n_ctx, logits_all=True)
            self.n_ctx = n_ctx

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

    def choice_logprobs(self, enc: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """(summed log-prob, all greedy) of every continuation of every (prompt ids, continuation ids) request."""
        out = []
        for prompt, conts in enc:
            self.reserve(len(prompt) + max(len(c) for c in conts))
            self.llm.reset()
            self.llm.eval(prompt)
            n = len(prompt)
            rows = []
            for c in conts:
                self.llm.n_tokens = n          # drop the previous choice: its KV cells are removed by eval
                self.llm.eval(c)
                logits = torch.from_numpy(self.llm.scores[n - 1:n + len(c) - 1].copy())
                target = torch.tensor(c, dtype=torch.long)
                lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
                rows.append((float(lp.sum()), bool((logits.argmax(-1) == target).all())))
            out.append(rows)
        return out

    def complete(self, tokenizer, prompts: list[str], max_new_tokens: int, *, done_pattern: Optional[str] = None,
                 stop_strings: Sequence[str] = (), progress=None) -> tuple[list[tuple[str, int]], str]:
        """Greedy completions (text, new tokens) of every prompt, in order, and the engine's name; the same stopping
        rules as the transformers engines (done pattern, stop strings, end-of-sequence tokens)."""
        from acf.models.tokenization import encode_prompt

        pat = re.compile(done_pattern or r"$^")
        stops = list(stop_strings)

        def stop(new: list[int]) -> bool:
            text = tokenizer.decode(new[-96:], skip_special_tokens=True)
            return bool(pat.search(text)) or any(s in text for s in stops)

        eos = _eos_ids(tokenizer)
        ids = [encode_prompt(tokenizer, p) for p in prompts]
        n_ctx = _round_up(max((len(i) for i in ids), default=0) + max_new_tokens + 8, 256)
        if self._gen is None or n_ctx > self._gen_ctx:
            if self._gen is not None:
                self._gen.close()
            self._gen, self._gen_ctx = open_llama(self.path, n_ctx, logits_all=False), n_ctx
        outs = []
        for p in ids:
            new, _ = _greedy(self._gen, p, max_new_tokens, stop=stop, eos=eos)
            n = len(new)
            while n and new[n - 1] in eos:
                n -= 1
            outs.append((tokenizer.decode(new[:n], skip_special_tokens=True), n))
            if progress:
                progress(1)
        return outs, "llama.cpp, one sequence at a time"

    def close(self) -> None:
        self.llm.close()
        if self._gen is not None:
            self._gen.close()
            self._gen = None


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


class LlamaCppBackend:
    """A GGUF candidate directory in llama.cpp (the evaluation back-end protocol, acf.evaluation.backend): every
    metric of it is measured on the file a user deploys."""

    name = "llamacpp"

    def __init__(self, model_dir: Path, tokenizer=None):
        from acf.models.gguf_file import GGUF_NAME, load_manifest, read_gguf
        from acf.models.loading import load_tokenizer

        self.model_dir = Path(model_dir)
        self.path = self.model_dir / GGUF_NAME
        self.manifest = load_manifest(self.model_dir)
        self.info = read_gguf(self.path)
        self.tokenizer = tokenizer or load_tokenizer(self.model_dir)
        self._lm: Optional[LlamaCppLM] = None

    @property
    def lm(self) -> "LlamaCppLM":
        if self._lm is None:
            self._lm = LlamaCppLM(self.path, 256)
        return self._lm

    def size(self) -> Measurement:
        return Measurement(value=float(self.info.size_bytes), unit="bytes", device="disk", runtime=runtime_label(),
                           method=f"bytes of the GGUF file ({self.manifest.type}; it holds weights and tokenizer)",
                           extra={"tensor_types": self.info.tensor_types})

    def params(self) -> Measurement:
        return Measurement(value=float(self.info.params), unit="count", device="disk",
                           method="elements of all tensors in the GGUF (tied embeddings stored once)")

    def bits_per_weight(self) -> Measurement:
        return Measurement(value=round(self.info.size_bytes * 8 / max(self.info.params, 1), 4), unit="bits",
                           device="disk", method="GGUF file bits (metadata, tokenizer and scales included) / tensor "
                                                 "elements")

    def sparsity(self, known: Optional[Measurement]) -> Measurement:
        return known or Measurement(value=None, unit="fraction", device="disk",
                                    method="not measurable in a quantized GGUF; the pipeline records what its "
                                           "pruning steps measured")

    def perf(self, wanted: Sequence[str], prompt: str, *, latency_tokens: int, batch_size: Optional[int],
             longest) -> dict[str, Measurement]:
        """Latency, ttft and throughput on a deployment-like context (no per-position logits, n_ctx sized to the
        longest prompt and answer, `longest()` tokens), and the RSS peak over its load and these runs."""
        from acf.models.tokenization import encode_prompt

        prompt_ids = encode_prompt(self.tokenizer, prompt)
        n_ctx = _round_up(max(len(prompt_ids) + latency_tokens, longest()) + 8, 256)
        out, rss, llm = latency(self.path, prompt_ids, latency_tokens, n_ctx=n_ctx)
        llm.close()
        if gpu_offload():
            # llama.cpp's CUDA buffers are outside torch's allocator and the process RSS; not measured yet
            out["memory"] = Measurement(value=None, unit="bytes", device=cpu_string(), runtime=runtime_string(),
                                        method="not measured: llama.cpp's GPU buffers are invisible to process "
                                               "RSS and torch (ACF_LLAMA_CPU=1 measures the CPU deployment)")
        else:
            out["memory"] = Measurement(value=float(rss.added), unit="bytes", device=cpu_string(),
                                        runtime=runtime_string(),
                                        method=f"peak process RSS increase (sampled every 5 ms) over llama.cpp "
                                               f"load (mmap) + latency generation, n_ctx {n_ctx}",
                                        extra={"load_seconds": out["latency"].extra.get("load_seconds")})
        return out

    def forced_batch(self, batch_size: Optional[int]) -> Optional[int]:
        return 1                 # LlamaCppLM answers one sequence at a time

    def reserve(self, n_tokens: int) -> None:
        """Size the logits context for sequences of up to `n_tokens` before a teacher-forced pass."""
        self.lm.reserve(n_tokens)

    def stamp(self, m: Measurement, via_lm: bool) -> None:
        if via_lm and m.value is not None:
            m.runtime = runtime_string()
            m.device = cpu_string()
            if "llama.cpp" not in m.method:
                m.method += " (logits from llama.cpp, one sequence at a time)"
        m.extra.setdefault("gguf_type", self.manifest.type)

    def close(self) -> None:
        if self._lm is not None:
            self._lm.close()
            self._lm = None


def _round_up(n: int, k: int) -> int:
    return ((n + k - 1) // k) * k


def _eos_ids(tok) -> list[int]:
    ids = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set()
    vocab = tok.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if t in vocab:
            ids.add(vocab[t])
    return sorted(ids)
