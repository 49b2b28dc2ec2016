"""Predict before spending, and aim: the two things done to a proposal before it becomes an episode.

* `assess`: the proposal's kld and size predicted by the run's surrogate (acf.search.surrogate, no model loaded);
  a sampler's proposal predicted to be dominated by a clear margin (a measured point at no larger predicted size
  with `margin` x lower kld) is screened out: its trial is told PRUNED with the prediction recorded
  (state.Screened), and the next proposal is asked. Seeds, the planner's and the user's proposals are never
  screened (the user or acf chose them on purpose); every proposal that runs keeps its prediction.
* `enqueue_aim`: before a sampled episode, the largest gap against the recipe frontier (acf.search.aim) becomes a
  partly fixed Optuna trial: no pruning, the precision budget whose predicted size is the recipe's and a quantizer
  that takes a budget (`aim_quantizer`); the sampler chooses its settings and kd_tune.

Both drivers use these, through a trial's proposal (acf.coordinator.trial.propose): the single-process graph and a
distributed worker.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Optional

import optuna

from acf.coordinator.run_context import RunContext
from acf.coordinator.state import Candidate, FrontierFile, Screened, now
from acf.methods.strategy import Strategy
from acf.search.aim import Gap, aims_this_episode, target
from acf.search.surrogate import Prediction, Surrogate

log = logging.getLogger(__name__)

#: screened only when predicted at least this many times the dominating point's kld (and 2 residual sds of the fit)
SCREEN_MARGIN = 2.0
#: proposals screened in a row before one runs anyway (a fit that screens everything must not stall the search)
MAX_SCREENS = 20
#: trial user attribute of an aimed trial (the gap it aims at)
T_AIM = "acf_aim"


def surrogate(ctx: RunContext) -> Surrogate:
    assert ctx.ff is not None
    return Surrogate.from_frontier(ctx.ff, ctx.spec)


def dominating(pred: Prediction, ff: FrontierFile) -> Optional[tuple[Candidate, float]]:
    """The measured point (recipe or episode) that dominates a prediction by the margin, with the margin used;
    None when none does or the prediction has no kld (pure)."""
    if pred.kld is None or pred.size is None:
        return None
    margin = max(SCREEN_MARGIN, math.exp(2 * pred.log_sd)) if pred.log_sd is not None else SCREEN_MARGIN
    pts = [c for c in list(ff.recipes) + list(ff.candidates)
           if c.status == "ok" and "kld" in c.metrics and "size" in c.metrics
           and c.metrics["kld"].value is not None and c.metrics["size"].value <= pred.size]
    if not pts:
        return None
    best = min(pts, key=lambda c: c.metrics["kld"].value)
    return (best, margin) if pred.kld >= margin * max(best.metrics["kld"].value, 1e-6) else None


def saved_seconds(ff: FrontierFile) -> Optional[float]:
    """The median wall time of the run's measured episodes: what a screened proposal is estimated to have saved."""
    walls = [c.timings.get("episode_wall") or sum(v for k, v in c.timings.items() if k in ("compress", "evaluate",
                                                                                        "proxy"))
             for c in ff.candidates if c.status in ("ok", "pruned")]
    walls = [w for w in walls if w]
    return round(statistics.median(walls), 1) if walls else None


def assess(ctx: RunContext, trial: Optional[optuna.Trial], strategy: Strategy, proposed_by: str,
           screenable: bool, screens_so_far: int = 0) -> tuple[Prediction, Optional[Screened]]:
    """The proposal's prediction, and its Screened record when it is screened out (its trial then told PRUNED)."""
    assert ctx.ff is not None
    try:
        pred = surrogate(ctx).predict(strategy)
    except Exception as e:  # noqa: BLE001 - a prediction is advisory: a failed fit must not stop the search
        log.warning("prediction failed: %s", e)
        return Prediction(how=f"no prediction: {type(e).__name__}: {e}"), None
    if not screenable or trial is None or screens_so_far >= MAX_SCREENS:
        return pred, None
    hit = dominating(pred, ctx.ff)
    if hit is None:
        return pred, None
    best, margin = hit
    rec = Screened(trial_number=trial.number, strategy=strategy, description=strategy.describe(),
                   proposed_by=proposed_by, prediction=pred, dominated_by=best.id,
                   dominated_kld=float(best.metrics["kld"].value), dominated_size=float(best.metrics["size"].value),
                   margin=round(margin, 3), saved_seconds=saved_seconds(ctx.ff), at=now())
    from acf.coordinator.run_store import T_SCREENED

    trial.set_user_attr(T_SCREENED, rec.model_dump(mode="json"))
    ctx.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    ctx.say(f"  [dim]screened out {strategy.describe()}: predicted kld {pred.kld:.4f} at "
            f"{(pred.size or 0) / 2**20:.1f} MiB, {best.id} measured {best.metrics['kld'].value:.4f} at no larger "
            f"size ({margin:.1f}x margin)[/]")
    return pred, rec


def seeds_left(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def enqueue_aim(ctx: RunContext, episode: int) -> Optional[dict[str, Any]]:
    """Enqueue the next trial aimed at the largest gap (see the module docstring); returns the aim, or None when
    this episode is not aimed (seeds left, a free episode, no recipe frontier, no reachable budget)."""
    ff, space, study = ctx.ff, ctx.space, ctx.study
    assert ff is not None
    if not aims_this_episode(episode, seeds_left(study)):
        return None
    gguf = space.quant_methods == ["gguf"]
    sur = surrogate(ctx)
    tried: list[float] = []
    while True:
        gap: Optional[Gap] = target(ff, exclude=tuple(tried))
        if gap is None:
            return None
        bits = sur.bits_for_size(gap.size, gguf=gguf)
        fixed = space.budget_params(bits, gguf=gguf) if bits is not None else {}
        if fixed:
            break
        tried.append(gap.size)
    pname, bname = ("gguf_precision", "gguf_budget") if gguf else ("precision", "budget")
    budget = float(fixed[bname]) if bname in fixed else float(fixed[pname])
    aim = {"size": gap.size, "recipe_id": gap.recipe_id, "recipe_kld": gap.recipe_kld, "acf_id": gap.acf_id,
           "ratio": None if math.isinf(gap.ratio) else round(gap.ratio, 4), "budget": budget}
    quant = "gguf" if gguf else aim_quantizer(ff, space, gap)
    params = {"prune": "none", **({"quant_only": quant} if quant else {}), **fixed}
    aim["quantizer"] = quant
    study.enqueue_trial(params, user_attrs={T_AIM: aim})
    return aim


def aim_quantizer(ff: Any, space: Any, gap: Gap) -> Optional[str]:
    """The quantizer an aimed episode uses: the one that made the best recipe at the gap's size (the strongest
    known there), else the one of acf's best candidate there, else the space's first that takes a budget. Only
    quantizers that take a precision budget qualify: a sampled quantizer without one (bitsandbytes NF4) would
    ignore the aimed size (seen in cpu16-search, episode 11)."""
    from acf.methods.registry import get as get_method

    budgeted = [q for q in space.quant_methods
                if (m := get_method(q)) is not None and m.search is not None and m.search.budgeted]
    for cid in (gap.recipe_id, gap.acf_id):
        if cid is None:
            continue
        try:
            steps = ff.candidate(cid).strategy.steps
        except (KeyError, AttributeError):
            continue
        for st in steps:
            if st.method in budgeted:
                return st.method
    return budgeted[0] if budgeted else None


def waiting_aim(study: optuna.Study) -> bool:
    """An aimed trial enqueued earlier and not asked yet (a resume after it was enqueued, or another worker's aim):
    not enqueued twice."""
    return any(T_AIM in t.user_attrs for t in study.get_trials(deepcopy=False,
                                                                states=(optuna.trial.TrialState.WAITING,)))


def aim_of(study: optuna.Study, number: int) -> Optional[dict[str, Any]]:
    return study.get_trials(deepcopy=False)[number].user_attrs.get(T_AIM)
