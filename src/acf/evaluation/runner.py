"""The evaluation subagent: one entry point that measures any set of metrics on a model directory, in the
back end that runs it (acf.evaluation.backend: transformers, or llama.cpp for a GGUF candidate). Each metric is
dispatched once here, whatever the back end; the metric names and properties come from acf.core.metrics."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

from acf.core.errors import AcfError
from acf.core.metrics import TABLE, check_backend, names
from acf.core.provenance import Measurement
from acf.tasks import Task
from acf.evaluation.backend import Backend, Loaded, TransformersBackend  # noqa: F401  (Loaded re-exported)
from acf.evaluation.batching import auto_batch_size
from acf.evaluation.fidelity import teacher_forced
from acf.evaluation.quality import accuracy
from acf.evaluation.sequences import task_sequences
from acf.models.tokenization import encode_prompt
from acf.evaluation.shared import EvalResult, Fidelity, build_fidelity, eval_items, measure_kld_general  # noqa: F401  (re-exported)

#: quality metrics acf measures itself (generation, teacher-forced logits) on any task that offers them; the others
#: are the task's own
QUALITY_METRICS = names(family="quality", where="generation") + names(family="quality", where="logits")
#: fidelity to the run's baseline, offered for every task (they need a baseline reference: `Fidelity`)
FIDELITY_METRICS = names(needs_reference=True)
#: tokens per sequence assumed when sizing batches for task-computed metrics (BBH 3-shot CoT prompts are the longest)
OWN_METRIC_SEQ_LEN = 2048
MODEL_METRICS = names(family="model")
ALL_METRICS = QUALITY_METRICS + FIDELITY_METRICS + MODEL_METRICS
DEFAULT_METRICS = names(default=True)


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


def open_backend(model_dir: Path, device: str = "cpu", *, loaded: Optional[Loaded] = None,
                 trust_remote_code: bool = False) -> Backend:
    """The back end a candidate is measured in: llama.cpp for a GGUF directory (its deployment runtime, on the CPU
    or every layer offloaded), transformers otherwise."""
    from acf.models.gguf_file import is_gguf_dir

    if is_gguf_dir(model_dir):
        from acf.evaluation.llamacpp import LlamaCppBackend

        return LlamaCppBackend(model_dir, tokenizer=loaded.tokenizer if loaded else None)
    return TransformersBackend(model_dir, device, loaded=loaded, trust_remote_code=trust_remote_code)


def evaluate(model_dir: str | Path, task: Task, metrics: Sequence[str] = DEFAULT_METRICS, *, limit: Optional[int] = 100,
             seed: Optional[int] = 0, device: str = "cpu", batch_size: Optional[int] = None, fewshot: int = 0,
             max_new_tokens: int = 256, accuracy_limit: Optional[int] = None, latency_tokens: int = 32,
             show_progress: bool = True, trust_remote_code: bool = False, loaded: Optional[Loaded] = None,
             item_offset: int = 0, fidelity: Optional[Fidelity] = None,
             known_sparsity: Optional[Measurement] = None) -> EvalResult:
    """Measure `metrics` for the model in `model_dir` on `task`, each metric once, in the model's back end.

    `loaded` reuses a model already in memory (the pipeline loads each candidate once for its proxy and full
    evaluation); the memory figure then still counts that load. `fidelity` holds the baseline references that
    kld/top1/kld_general compare against. `known_sparsity` is the sparsity the pruning steps measured, used for
    quantized models (whose dequantized grid has exact zeros that are not sparsity).
    """
    metrics = check_metrics(metrics, task)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AcfError(f"model directory {model_dir} has no config.json")
    fid_wanted = [m for m in metrics if TABLE[m].needs_reference]
    if fid_wanted and fidelity is None:
        raise AcfError(f"{', '.join(fid_wanted)} compare against the uncompressed model: give a baseline "
                       f"(acf eval --baseline MODEL; a run uses its own)")
    t0 = time.perf_counter()
    backend = open_backend(model_dir, device, loaded=loaded, trust_remote_code=trust_remote_code)
    for m in metrics:
        check_backend(m, backend.name)
    out: dict[str, Measurement] = {}
    via_lm: set[str] = set()          # measured by running the model on items (the back end stamps its runtime)
    preds: list[dict] = []
    quality = [m for m in metrics if m in task.metrics]
    # Metrics the task computes itself (multiple choice, BBH, HumanEval) go to task.evaluate_metrics in one
    # call (MC metrics share one scoring pass); the rest go where the metric table says acf measures them:
    # teacher-forced logits (answer NLL on GSM8K, kld, top1), general text (kld_general), generation (accuracy).
    own = [m for m in quality if m in getattr(task, "task_metrics", ())]
    forced = [m for m in metrics if TABLE[m].where == "logits" and m not in own]
    general = [m for m in metrics if TABLE[m].where == "general_text"]
    generated = [m for m in quality if TABLE[m].where == "generation" and m not in own]
    items = eval_items(task, limit, seed, item_offset) if (quality or forced) else None
    try:
        if "size" in metrics:
            out["size"] = backend.size()
        if "bits_per_weight" in metrics:
            out["bits_per_weight"] = backend.bits_per_weight()
        perf = [m for m in names(where="runtime") if m in metrics]
        if perf:
            first = task.load("test", limit=1, seed=seed)[0]
            tok = backend.tokenizer

            def longest() -> int:       # the longest prompt and answer of these items (llama.cpp sizes n_ctx by it)
                return max((len(encode_prompt(tok, task.chat_prompt(it, tok, fewshot))) for it in items or []),
                           default=0) + max_new_tokens

            res = backend.perf(perf, task.chat_prompt(first, tok, fewshot), latency_tokens=latency_tokens,
                               batch_size=batch_size, longest=longest)
            out.update({k: v for k, v in res.items() if k in perf or k == "latency"})
        if "params" in metrics:
            out["params"] = backend.params()
        if "sparsity" in metrics:
            out["sparsity"] = backend.sparsity(known_sparsity)
        with _progress(show_progress) as prog:
            tok = backend.tokenizer if (own or forced or general or generated) else None
            if own:
                lm = backend.lm
                tid = prog.add_task(", ".join(own), total=task.progress_units(own, len(items))) if prog else None
                own_bs = batch_size or auto_batch_size(lm, len(items), "score", OWN_METRIC_SEQ_LEN)
                res, preds = task.evaluate_metrics(own, lm, tok, items, batch_size=own_bs,
                                                   progress=(lambda k: prog.advance(tid, k)) if prog else None)
                out.update(res)
                via_lm.update(res)
            if forced or general:
                seqs = task_sequences(task, tok, items, fewshot) if forced else []
                backend.reserve(max([s.length for s in seqs] + [1]
                                    + [s.length for s in (fidelity.general_seqs if fidelity else [])]))
                fbs = backend.forced_batch(batch_size)
                if forced:
                    tid = prog.add_task(" + ".join(forced), total=len(items)) if prog else None
                    res = teacher_forced(backend.lm, tok, seqs, forced, reference=fidelity.task if fidelity else None,
                                         batch_size=fbs, label=f"{task.name} test items",
                                         progress=(lambda k: prog.advance(tid, k)) if prog else None)
                    out.update(res)
                    via_lm.update(res)
                for m in general:
                    out[m] = measure_kld_general(backend.lm, tok, fidelity, fbs, prog)
                    via_lm.add(m)
            for m in generated:
                acc_items = items[:accuracy_limit] if accuracy_limit else items
                tid = prog.add_task(f"{m} (generation)", total=len(acc_items)) if prog else None
                out[m], preds = accuracy(backend.lm, tok, task, acc_items, batch_size=batch_size, fewshot=fewshot,
                                         max_new_tokens=max_new_tokens,
                                         progress=(lambda k: prog.advance(tid, k)) if prog else None)
                via_lm.add(m)
    finally:
        backend.close()
    if items is not None:
        first_id = items[0].id if items else None
        for m in quality + forced:
            if m in out:
                out[m].extra.setdefault("items", {"offset": item_offset, "count": len(items), "first_id": first_id})
    for k, m in out.items():
        backend.stamp(m, k in via_lm)
    return EvalResult(model_path=str(model_dir), task=task.name, metrics=out, predictions=preds,
                      seconds=round(time.perf_counter() - t0, 3))


def _progress(show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=False)
