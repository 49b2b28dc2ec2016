"""The baseline's measurement: the sanity check (acf.models.sanity), the uncompressed model evaluated with the same
evaluator and items as every candidate, its fidelity reference built from the same load, and (--runtime llamacpp)
its costs measured in llama.cpp on its F16 GGUF."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from acf.core.atomic import write_json
from acf.core.errors import AcfError
from acf.core.objectives import QUALITY
from acf.core.provenance import Measurement
from acf.coordinator.records import metrics_line, objective_values
from acf.coordinator.run_context import RUNTIME_METRICS, RunContext
from acf.coordinator.run_eval import evaluate_in_run, metrics_to_measure
from acf.coordinator.state import Candidate, now
from acf.methods.strategy import Strategy

if TYPE_CHECKING:
    from acf.evaluation.runner import Loaded
    from acf.evaluation.sanity import SanityReport


def evaluate_baseline(ctx: RunContext, model_path: str) -> Candidate:
    """The uncompressed model with the same evaluator and items; its reference distributions are computed from
    the same load and cached for every candidate. Returns its record; the caller stores it (the single process in
    its study, a worker in the shared one)."""
    from acf.evaluation.runner import Loaded
    recorded = recorded_sanity(ctx)
    if recorded is not None:
        judge_sanity(ctx, recorded)     # a resumed run: the check is not measured again
    t0 = time.time()
    loaded = Loaded.load(model_path, ctx.cfg.device, ctx.cfg.trust_remote_code)
    try:
        if recorded is None and not ctx.cfg.skip_sanity:
            judge_sanity(ctx, measure_sanity(ctx, loaded))
        elif recorded is None:
            ctx.say("[yellow]baseline sanity check skipped[/] (--skip-sanity)")
        ctx.say("[bold]baseline[/]: evaluating the uncompressed model with the same evaluator")
        ctx.fidelity("search", loaded=loaded)
        res = evaluate_in_run(ctx, Path(model_path), metrics_to_measure(ctx), ctx.cfg.limit, loaded=loaded)
        proxy = {}
        if ctx.cfg.proxy_limit:
            q = [m for m in ctx.cfg.objectives if m in QUALITY]
            if q:
                proxy = evaluate_in_run(ctx, Path(model_path), q, ctx.cfg.proxy_limit, loaded=loaded).metrics
    finally:
        loaded.free()
    if ctx.cfg.runtime == "llamacpp":
        baseline_costs_in_llamacpp(ctx, Path(model_path), res.metrics)
    cand = Candidate(id="baseline", episode=0, strategy=Strategy(), description="baseline (no compression)",
                     proposed_by="baseline", metrics=res.metrics, proxy_metrics=proxy,
                     objectives=objective_values(ctx.cfg.objectives, res.metrics), retention=1.0, artifact=model_path,
                     artifact_kept=True, timings={"evaluate": round(time.time() - t0, 2)}, started_at=now(),
                     finished_at=now())
    write_json(ctx.dir / "baseline_predictions.json", res.predictions)
    ctx.say(metrics_line("baseline", res.metrics, ctx.cfg.objectives))
    return cand


def recorded_sanity(ctx: RunContext) -> Optional["SanityReport"]:
    """The sanity check this run recorded (RUN_DIR/sanity.json), or None. An unreadable record is named and
    measured again, never taken as a pass."""
    from acf.evaluation.sanity import SANITY_FILE, load_report

    try:
        return load_report(ctx.dir / SANITY_FILE)
    except AcfError as e:
        ctx.say(f"[yellow]{e}[/]: measuring the sanity check again")
        return None


def measure_sanity(ctx: RunContext, loaded: "Loaded") -> "SanityReport":
    """Check the baseline before the search spends anything (acf.models.sanity): a few search items' text, a greedy
    continuation, the tokenizer's granularity; recorded atomically in RUN_DIR/sanity.json."""
    from acf.evaluation.runner import eval_items
    from acf.evaluation.sanity import SANITY_FILE, SANITY_ITEMS, check_baseline, save_report

    cfg = ctx.cfg
    items = eval_items(ctx.task, min(SANITY_ITEMS, cfg.limit or SANITY_ITEMS), cfg.seed)
    ctx.say("[bold]sanity check[/] of the baseline: NLL on the task's text, a greedy continuation, characters per "
            "token")
    rep = check_baseline(loaded.model, loaded.tokenizer, ctx.task, items, cfg.device, batch_size=cfg.eval_batch_size,
                         model_name=cfg.model)
    save_report(rep, ctx.dir / SANITY_FILE)
    return rep


def judge_sanity(ctx: RunContext, rep: "SanityReport") -> None:
    """Stop the run (SanityFailed, exit 2) when the check found problems, unless --skip-sanity overrides them."""
    from acf.evaluation.sanity import SANITY_FILE, SanityFailed, failure_message, summary

    ctx.say(f"  {summary(rep)}")
    if rep.ok:
        return
    if ctx.cfg.skip_sanity:
        ctx.say(f"  [yellow]going on despite it (--skip-sanity)[/]: {'; '.join(rep.problems)}")
        return
    raise SanityFailed(failure_message(rep, f"acf run --resume {ctx.dir} --skip-sanity (values in "
                                            f"{ctx.dir / SANITY_FILE})"))


def baseline_costs_in_llamacpp(ctx: RunContext, model_path: Path, metrics: dict[str, Measurement]) -> None:
    """--runtime llamacpp: the baseline's latency/ttft/throughput/memory (and size) measured in llama.cpp on its F16
    GGUF (llama.cpp's converter, no quantization), so the latency objective compares one runtime. Its quality
    metrics stay those of the HF model, which is what kld's reference is. A baseline that cannot be exported fails
    the run: comparing llama.cpp candidates with a transformers baseline would be the mixed comparison this avoids."""
    from acf.methods import StepContext, run_strategy
    from acf.methods.strategy import validate_strategy

    out = ctx.dir / "baseline-gguf-f16"
    if not (out / "model.gguf").is_file():
        strat = validate_strategy({"steps": [{"method": "gguf", "params": {"type": "F16", "imatrix": False}}]})
        recs = run_strategy(strat, model_path, out, StepContext(device="cpu", task=ctx.task, seed=ctx.cfg.seed),
                            log_dir=ctx.dir / "baseline-gguf-f16.logs")
        if not recs or recs[-1].status != "ok":
            raise AcfError(f"--runtime llamacpp: the baseline could not be exported to GGUF F16 "
                           f"({recs[-1].reason if recs else 'no step ran'})")
    want = [m for m in metrics_to_measure(ctx) if m in RUNTIME_METRICS or m == "size"]
    res = evaluate_in_run(ctx, out, want, ctx.cfg.limit)
    for k, m in res.metrics.items():
        m.extra["measured_on"] = "the baseline's F16 GGUF in llama.cpp (--runtime llamacpp)"
        if k == "size":
            m.extra["hf_checkpoint_bytes"] = metrics["size"].value if "size" in metrics else None
        metrics[k] = m
