"""The evaluation subagent: one entry point that measures any set of metrics on a model directory."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch
from pydantic import BaseModel, Field

from ..errors import AcfError
from ..models import free, load_model
from ..provenance import Measurement, device_string, runtime_string
from ..tasks import Task
from .batching import CPU_BATCH, auto_batch_size
from .perf import PeakRSS, latency, model_stats, size_metric, stored_tensor_bits
from .quality import accuracy, answer_nll

QUALITY_METRICS = ("accuracy", "answer_nll")
#: tokens per sequence assumed when sizing batches for task-computed metrics (BBH 3-shot CoT prompts are the longest)
OWN_METRIC_SEQ_LEN = 2048
MODEL_METRICS = ("latency", "ttft", "throughput", "memory", "size", "params", "sparsity", "bits_per_weight")
ALL_METRICS = QUALITY_METRICS + MODEL_METRICS
DEFAULT_METRICS = ("accuracy", "answer_nll", "latency", "memory", "size", "params", "sparsity", "bits_per_weight")


class EvalResult(BaseModel):
    model_path: str
    task: str
    metrics: dict[str, Measurement]
    predictions: list[dict] = Field(default_factory=list)
    seconds: float = 0.0

    def value(self, name: str) -> Optional[float]:
        m = self.metrics.get(name)
        return None if m is None else m.value


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
             show_progress: bool = True, trust_remote_code: bool = False, loaded=None) -> EvalResult:
    """Measure `metrics` for the model in `model_dir` on `task`.

    `loaded=(model, tokenizer)` reuses a model already in memory (the pipeline passes the freshly compressed
    model so it is not reloaded from disk); memory is then not re-measured from a cold load.
    """
    metrics = check_metrics(metrics, task)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AcfError(f"model directory {model_dir} has no config.json")
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
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRSS() if not cuda else nullcontext()
    with rss:
        t_load = time.perf_counter()
        if loaded is not None:
            model, tok = loaded
        else:
            model, tok = load_model(model_dir, device, trust_remote_code=trust_remote_code)
        load_s = time.perf_counter() - t_load
        items_for_latency = task.load("test", limit=1, seed=seed)
        if any(m in metrics for m in ("latency", "ttft", "throughput")):
            lat = latency(model, tok, task.chat_prompt(items_for_latency[0], tok, fewshot), new_tokens=latency_tokens,
                          throughput_batch=throughput_bs)
            for k in ("latency", "ttft", "throughput"):
                if k in metrics or k == "latency":
                    out[k] = lat[k]
        elif "memory" in metrics:
            enc = tok([task.chat_prompt(items_for_latency[0], tok, fewshot)], return_tensors="pt").to(device)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    if "memory" in metrics:
        if cuda:
            peak = torch.cuda.max_memory_allocated()
            how = "torch.cuda.max_memory_allocated over load + latency/throughput generation"
        else:
            peak = rss.added
            how = "peak process RSS increase (sampled every 5 ms) over load + latency/throughput generation"
        if loaded is not None:
            how += " (model already in memory: weights not counted by RSS increase)" if not cuda else ""
        out["memory"] = Measurement(value=float(peak), unit="bytes", device=device_string(device),
                                    runtime=runtime_string(), method=how, extra={"load_seconds": round(load_s, 3)})
    st = model_stats(model)
    if "params" in metrics:
        out["params"] = Measurement(value=float(st["params"]), unit="count", device=device_string(device),
                                    method="logical parameters of the loaded model (tied weights once)")
    if "sparsity" in metrics:
        v = st["linear_zeros"] / st["linear_weights"] if st["linear_weights"] else None
        out["sparsity"] = Measurement(value=v, unit="fraction", device=device_string(device),
                                      method="share of exact zeros in Linear weights (lm_head excluded)",
                                      extra={"note": "n/a for packed bnb weights"} if v is None else {})
    if "bits_per_weight" in metrics and out["bits_per_weight"].value is not None:
        out["bits_per_weight"].value = round(out["bits_per_weight"].value / max(st["params"], 1), 4)
        out["bits_per_weight"].method = "stored tensor bits (safetensors headers, scales included) / logical parameters"

    items = None
    quality = [m for m in metrics if m in task.metrics]
    # Metrics the task computes itself (multiple choice, BBH, HumanEval) go to task.evaluate_metrics in one
    # call (MC metrics share one scoring pass); the rest (GSM8K) keep the generic generation/NLL paths.
    own = [m for m in quality if m in getattr(task, "task_metrics", ())]
    generic = [m for m in quality if m not in own]
    if quality:
        items = task.load("test", limit=limit, seed=seed)
    prog_ctx = _progress(show_progress)
    with prog_ctx as prog:
        if own:
            tid = prog.add_task(", ".join(own), total=task.progress_units(own, len(items))) if prog else None
            own_bs = batch_size or auto_batch_size(model, len(items), "score", OWN_METRIC_SEQ_LEN)
            res, p = task.evaluate_metrics(own, model, tok, items, batch_size=own_bs,
                                           progress=(lambda k: prog.advance(tid, k)) if prog else None)
            out.update(res)
            preds = p
        if "answer_nll" in generic:
            tid = prog.add_task("answer NLL", total=len(items)) if prog else None
            out["answer_nll"] = answer_nll(model, tok, task, items, batch_size=batch_size, fewshot=fewshot,
                                           progress=(lambda k: prog.advance(tid, k)) if prog else None)
        if "accuracy" in generic:
            acc_items = items[:accuracy_limit] if accuracy_limit else items
            tid = prog.add_task("accuracy (generation)", total=len(acc_items)) if prog else None
            out["accuracy"], preds = accuracy(model, tok, task, acc_items, batch_size=batch_size, fewshot=fewshot,
                                              max_new_tokens=max_new_tokens,
                                              progress=(lambda k: prog.advance(tid, k)) if prog else None)
    if loaded is None:
        free(model)
    return EvalResult(model_path=str(model_dir), task=task.name, metrics=out, predictions=preds,
                      seconds=round(time.perf_counter() - t0, 3))


def _progress(show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)
