"""How a run evaluates a model directory: which metrics (objectives, the cheap ones, fidelity), on which items
(search or report, `RunContext.item_range`), against which reference (`RunContext.fidelity`). Shared by the
baseline's measurement and every candidate's, so both are measured alike."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from acf.core.provenance import Measurement
from acf.coordinator.run_context import CHEAP_METRICS, FIDELITY_MEASURED, RUNTIME_METRICS, RunContext


def metrics_to_measure(ctx: RunContext) -> list[str]:
    want = list(ctx.cfg.objectives) + list(CHEAP_METRICS) + list(FIDELITY_MEASURED)
    if "answer_nll" in ctx.task.metrics:
        want.append("answer_nll")
    if any(m in ctx.cfg.objectives for m in RUNTIME_METRICS):
        want += ["ttft", "throughput"]
    return list(dict.fromkeys(want))


def evaluate_in_run(ctx: RunContext, model_dir: Path, metrics: list[str], limit: Optional[int], *, loaded=None,
              part: str = "search", known_sparsity: Optional[Measurement] = None):
    from acf.evaluation import evaluate

    offset, _ = ctx.item_range(part)
    fid = ctx.fidelity(part) if any(m in FIDELITY_MEASURED for m in metrics) else None
    return evaluate(model_dir, ctx.task, metrics, limit=limit, seed=ctx.cfg.seed, device=ctx.cfg.device,
                    batch_size=ctx.cfg.eval_batch_size, accuracy_limit=ctx.cfg.accuracy_limit,
                    latency_tokens=ctx.cfg.latency_tokens, show_progress=ctx.console.is_terminal,
                    trust_remote_code=ctx.cfg.trust_remote_code, loaded=loaded, item_offset=offset, fidelity=fid,
                    known_sparsity=known_sparsity)
