"""The evaluation subagent: one entry point that measures any set of metrics on a model directory."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from acf.core.errors import AcfError
from acf.models.loading import free, load_model
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.tasks import Task
from acf.evaluation.batching import CPU_BATCH, auto_batch_size
from acf.core.instruments import PeakRSS
from acf.evaluation.perf import latency, model_stats, size_metric, stored_tensor_bits
from acf.evaluation.fidelity import teacher_forced
from acf.evaluation.quality import accuracy
from acf.evaluation.sequences import task_sequences
from acf.evaluation.shared import EvalResult, Fidelity, build_fidelity, eval_items, measure_kld_general  # noqa: F401  (re-exported)

QUALITY_METRICS = ("accuracy", "answer_nll")
#: fidelity to the run's baseline, offered for every task (they need a baseline reference: `Fidelity`)
FIDELITY_METRICS = ("kld", "top1", "kld_general")
#: tokens per sequence assumed when sizing batches for task-computed metrics (BBH 3-shot CoT prompts are the longest)
OWN_METRIC_SEQ_LEN = 2048
MODEL_METRICS = ("latency", "ttft", "throughput", "memory", "size", "params", "sparsity", "bits_per_weight")
ALL_METRICS = QUALITY_METRICS + FIDELITY_METRICS + MODEL_METRICS
DEFAULT_METRICS = ("accuracy", "answer_nll", "latency", "memory", "size", "params", "sparsity", "bits_per_weight")


@dataclass
class Loaded:
    """A model loaded once for several evaluations of one candidate (proxy, then full), with its load's cost.

    The memory metric of a later evaluation is the peak over this load and its own generation, measured from the
    same starting point, so loading once does not hide the weights from the figure."""

    model: Any
    tokenizer: Any
    device: str
    load_seconds: float = 0.0
    rss_start: int = 0           # CPU: process RSS before the load
    rss_peak: int = 0            # CPU: peak RSS during the load
    cuda_peak: int = 0           # CUDA: max allocated during the load

    @classmethod
    def load(cls, model_dir: str | Path, device: str, trust_remote_code: bool = False) -> "Loaded":
        from acf.models.gguf_file import is_gguf_dir

        if is_gguf_dir(model_dir):
            # a GGUF candidate is measured in llama.cpp, which opens the file itself per measurement
            # (acf.evaluation.llamacpp): only the tokenizer is kept here
            from acf.models.loading import load_tokenizer

            return cls(model=None, tokenizer=load_tokenizer(model_dir, trust_remote_code), device="cpu")
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        meter = PeakRSS() if not cuda else nullcontext()
        with meter:
            model, tok = load_model(model_dir, device, trust_remote_code=trust_remote_code)
        out = cls(model=model, tokenizer=tok, device=device, load_seconds=time.perf_counter() - t0)
        if cuda:
            out.cuda_peak = int(torch.cuda.max_memory_allocated())
        else:
            out.rss_start, out.rss_peak = meter.start, meter.peak
        return out

    def free(self) -> None:
        free(self.model)
        self.model = None


def default_metrics(task: Task) -> list[str]:
    """DEFAULT_METRICS with the task's own quality metrics (e.g. truthfulqa: mc1, mc2; humaneval: pass@1)."""
    quality = [m for m in task.metrics]
    return quality + [m for m in DEFAULT_METRICS if m not in QUALITY_METRICS]


def check_metrics(metrics: Sequence[str], task: Task) -> list[str]:
    """Validate metric names: model metrics, or quality metrics the task offers (task metrics included)."""
    out = []
    for m in metrics:
        m = m.strip()
        if not m:
            continue
        if m in FIDELITY_METRICS:
            out.append(m)
            continue
        if m not in ALL_METRICS and m not in task.metrics:
            raise AcfError(f"unknown metric {m!r}: choose from {', '.join(sorted(set(ALL_METRICS) | set(task.metrics)))}")
        if m in QUALITY_METRICS and m not in task.metrics:
            raise AcfError(f"task {task.name} does not offer metric {m!r} (it offers {', '.join(task.metrics)})")
        out.append(m)
    if not out:
        raise AcfError("no metrics asked for")
    return out


def evaluate(model_dir: str | Path, task: Task, metrics: Sequence[str] = DEFAULT_METRICS, *, limit: Optional[int] = 100,
             seed: Optional[int] = 0, device: str = "cpu", batch_size: Optional[int] = None, fewshot: int = 0,
             max_new_tokens: int = 256, accuracy_limit: Optional[int] = None, latency_tokens: int = 32,
             show_progress: bool = True, trust_remote_code: bool = False, loaded: Optional[Loaded] = None,
             item_offset: int = 0, fidelity: Optional[Fidelity] = None,
             known_sparsity: Optional[Measurement] = None) -> EvalResult:
    """Measure `metrics` for the model in `model_dir` on `task`.

    `loaded` reuses a model already in memory (the pipeline loads each candidate once for its proxy and full
    evaluation); the memory figure then still counts that load. `fidelity` holds the baseline references that
    kld/top1/kld_general compare against. `known_sparsity` is the sparsity the pruning steps measured, used for
    quantized models (whose dequantized grid has exact zeros that are not sparsity).
    """
    metrics = check_metrics(metrics, task)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AcfError(f"model directory {model_dir} has no config.json")
    from acf.models.gguf_file import is_gguf_dir

    if is_gguf_dir(model_dir):
        # the deployment runtime of a GGUF is llama.cpp: every metric of it is measured there, on the CPU
        from acf.evaluation.llamacpp import evaluate_gguf

        if [m for m in metrics if m in FIDELITY_METRICS] and fidelity is None:
            raise AcfError("kld/top1/kld_general compare against the uncompressed model: give a baseline")
        return evaluate_gguf(model_dir, task, metrics, limit=limit, seed=seed, fewshot=fewshot,
                             max_new_tokens=max_new_tokens, accuracy_limit=accuracy_limit,
                             latency_tokens=latency_tokens, item_offset=item_offset, fidelity=fidelity,
                             known_sparsity=known_sparsity, tokenizer=loaded.tokenizer if loaded else None)
    fid_wanted = [m for m in metrics if m in FIDELITY_METRICS]
    if fid_wanted and fidelity is None:
        raise AcfError(f"{', '.join(fid_wanted)} compare against the uncompressed model: give a baseline "
                       f"(acf eval --baseline MODEL; a run uses its own)")
    # batch_size=None: quality metrics size their batch from free GPU memory (acf.evaluation.batching; CPU
    # keeps 8); the throughput probe uses a fixed batch so its figure is comparable across models.
    throughput_bs = batch_size or (64 if device.startswith("cuda") else CPU_BATCH)
    t0 = time.perf_counter()
    out: dict[str, Measurement] = {}
    preds: list[dict] = []
    if "size" in metrics:
        out["size"] = size_metric(model_dir)
    if "bits_per_weight" in metrics:
        bits = stored_tensor_bits(model_dir)
        out["bits_per_weight"] = Measurement(value=None if bits is None else bits, unit="bits", device="disk",
                                             method="stored tensor bits from safetensors headers")  # divided below
    needs_model = any(m not in ("size",) for m in metrics)
    if not needs_model:
        return EvalResult(model_path=str(model_dir), task=task.name, metrics=out, seconds=time.perf_counter() - t0)

    cuda = device.startswith("cuda")
    own_load = loaded is None
    if own_load:
        loaded = Loaded.load(model_dir, device, trust_remote_code=trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    perf_wanted = any(m in metrics for m in ("latency", "ttft", "throughput", "memory"))
    if perf_wanted:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss = PeakRSS() if not cuda else nullcontext()
        with rss:
            items_for_latency = task.load("test", limit=1, seed=seed)
            if any(m in metrics for m in ("latency", "ttft", "throughput")):
                lat = latency(model, tok, task.chat_prompt(items_for_latency[0], tok, fewshot),
                              new_tokens=latency_tokens, throughput_batch=throughput_bs)
                for k in ("latency", "ttft", "throughput"):
                    if k in metrics or k == "latency":
                        out[k] = lat[k]
            else:
                enc = tok([task.chat_prompt(items_for_latency[0], tok, fewshot)], return_tensors="pt").to(device)
                with torch.inference_mode():
                    model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        if "memory" in metrics:
            if cuda:
                peak = max(loaded.cuda_peak, int(torch.cuda.max_memory_allocated()))
                how = "torch.cuda.max_memory_allocated over load + latency/throughput generation"
            else:
                peak = max(loaded.rss_peak, rss.peak) - loaded.rss_start
                how = "peak process RSS increase (sampled every 5 ms) over load + latency/throughput generation"
            out["memory"] = Measurement(value=float(peak), unit="bytes", device=device_string(device),
                                        runtime=runtime_string(), method=how,
                                        extra={"load_seconds": round(loaded.load_seconds, 3)})
    st = model_stats(model)
    if "params" in metrics:
        out["params"] = Measurement(value=float(st["params"]), unit="count", device=device_string(device),
                                    method="logical parameters of the loaded model (tied weights once; quantization "
                                           "scales, zero points and g_idx not counted)")
    if "sparsity" in metrics:
        out["sparsity"] = _sparsity(model_dir, st, device, known_sparsity)
    if "bits_per_weight" in metrics and out["bits_per_weight"].value is not None:
        out["bits_per_weight"].value = round(out["bits_per_weight"].value / max(st["params"], 1), 4)
        out["bits_per_weight"].method = ("stored tensor bits (safetensors headers, scales included) / logical "
                                         "parameters")

    quality = [m for m in metrics if m in task.metrics]
    # Metrics the task computes itself (multiple choice, BBH, HumanEval) go to task.evaluate_metrics in one
    # call (MC metrics share one scoring pass); the rest (GSM8K) keep the generic generation/teacher-forced paths.
    own = [m for m in quality if m in getattr(task, "task_metrics", ())]
    generic = [m for m in quality if m not in own]
    forced = [m for m in ("answer_nll", "kld", "top1") if m in metrics and (m != "answer_nll" or m in generic)]
    items = eval_items(task, limit, seed, item_offset) if (quality or forced) else None
    with _progress(show_progress) as prog:
        if own:
            tid = prog.add_task(", ".join(own), total=task.progress_units(own, len(items))) if prog else None
            own_bs = batch_size or auto_batch_size(model, len(items), "score", OWN_METRIC_SEQ_LEN)
            res, p = task.evaluate_metrics(own, model, tok, items, batch_size=own_bs,
                                           progress=(lambda k: prog.advance(tid, k)) if prog else None)
            out.update(res)
            preds = p
        if forced:
            tid = prog.add_task(" + ".join(forced), total=len(items)) if prog else None
            seqs = task_sequences(task, tok, items, fewshot)
            out.update(teacher_forced(model, tok, seqs, forced, reference=fidelity.task if fidelity else None,
                                      batch_size=batch_size, label=f"{task.name} test items",
                                      progress=(lambda k: prog.advance(tid, k)) if prog else None))
        if "kld_general" in metrics:
            out["kld_general"] = measure_kld_general(model, tok, fidelity, batch_size, prog)
        if "accuracy" in generic:
            acc_items = items[:accuracy_limit] if accuracy_limit else items
            tid = prog.add_task("accuracy (generation)", total=len(acc_items)) if prog else None
            out["accuracy"], preds = accuracy(model, tok, task, acc_items, batch_size=batch_size, fewshot=fewshot,
                                              max_new_tokens=max_new_tokens,
                                              progress=(lambda k: prog.advance(tid, k)) if prog else None)
    if items is not None:
        first = items[0].id if items else None
        for m in quality + forced:
            if m in out:
                out[m].extra.setdefault("items", {"offset": item_offset, "count": len(items), "first_id": first})
    if own_load:
        loaded.free()
    return EvalResult(model_path=str(model_dir), task=task.name, metrics=out, predictions=preds,
                      seconds=round(time.perf_counter() - t0, 3))


def _sparsity(model_dir: Path, st: dict, device: str, known: Optional[Measurement]) -> Measurement:
    """Exact zeros of Linear weights; for a quantized model, what its pruning steps measured before quantizing.

    A dequantized W4 grid holds exact zeros (about 15% for symmetric int4) that no sparse kernel can use and no
    pruning made, so counting them would report sparsity a quantize-only recipe does not have."""
    from acf.models.loading import quant_method

    if quant_method(model_dir) is not None:
        if known is not None:
            return known
        return Measurement(value=None, unit="fraction", device=device_string(device),
                           method="not measurable on a quantized model's dequantized weights (its grid has exact "
                                  "zeros); the pipeline records the sparsity its pruning steps measured")
    v = st["linear_zeros"] / st["linear_weights"] if st["linear_weights"] else None
    return Measurement(value=v, unit="fraction", device=device_string(device),
                       method="share of exact zeros in Linear weights (lm_head excluded)",
                       extra={"note": "n/a for packed bnb weights"} if v is None else {})


def _progress(show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)
