"""A trial's lifecycle, one function per step for every driver: the single-process graph (acf.coordinator.graph),
a distributed worker and the workers' approval queue (acf.distributed).

* `propose`: an asked trial's strategy and who proposed it (`trial_proposal`), validated; a repeat of an evaluated
  strategy is told that result at once (the sampler learns, no compute is spent), a proposal screened out by its
  prediction is told PRUNED (acf.coordinator.screening); what is left runs as an episode.
* `record`: the finished episode's candidate, scored against the run's baseline, onto its trial with the tell
  (`tell`); idempotent, so a process killed while recording records again safely.
* `close`: a trial that will not run as proposed (a user's edit or stop, the budget, approval bookkeeping), told
  FAIL with why, so it never stays RUNNING.

What differs by driver stays with the driver: where trials come from (the planner and the aim in one process, the
approval queue and the budget across workers) and what a refused strategy becomes (a rejected record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from acf.core.errors import StrategyError
from acf.coordinator.records import kld_of, score
from acf.coordinator.run_context import RunConfig, RunContext
from acf.coordinator.run_store import (T_CLOSED, T_DUPLICATE, T_PROPOSAL, T_RECORD, T_RELEASED, T_STRATEGY,
                                       T_STRATEGY_KEY,
                                       baseline_objectives, put_loose_record, put_trial_record)
from acf.coordinator.screening import T_AIM, assess
from acf.coordinator.state import Candidate, FrontierFile
from acf.methods.strategy import Strategy, validate_strategy
from acf.search.space import trial_for
from acf.search.surrogate import Prediction

#: what `record` did: stored the candidate and told its trial; found it stored by an earlier attempt (a process
#: killed after recording records again); or, in a shared study, dropped it (the trial was finished elsewhere)
Recorded = Literal["recorded", "already", "discarded"]


# ---- propose -----------------------------------------------------------------------------------------------------

@dataclass
class Proposal:
    """A proposal that runs as an episode; or one validation refused (`rejected`: why; its trial still open, the
    driver records it); or one whose trial `propose` told at once (`closed`: repeat | running | screened)."""

    strategy: Strategy
    proposed_by: str
    prediction: Optional[Prediction] = None
    rejected: Optional[str] = None
    closed: Optional[str] = None

    @property
    def runs(self) -> bool:
        return self.rejected is None and self.closed is None


def proposer(cfg: RunConfig, t: FrozenTrial) -> str:
    """Who proposed a stored trial: the aim (acf.coordinator.screening), a seed recipe or grid point, the sampler;
    an approved proposal keeps what the user was shown, a retry says which trial it retries."""
    shown = (t.user_attrs.get(T_PROPOSAL) or {}).get("proposed_by")
    aim = t.user_attrs.get(T_AIM)
    if shown:
        who = shown
    elif aim:
        gap = "acf has nothing that small" if aim.get("ratio") is None else f"acf at {aim['ratio']:.2f}x its kld"
        who = (f"optuna:{cfg.sampler} aimed at {aim['size'] / 2**20:.1f} MiB (budget {aim['budget']} bits; "
               f"{aim['recipe_id']}: {gap})")
    elif t.system_attrs.get("fixed_params"):
        who = "seed recipe" if cfg.sampler != "grid" else "preset grid"
    else:
        who = f"optuna:{cfg.sampler}"
    if "retry_history" in t.system_attrs:
        who += f" (retry of trial {t.system_attrs['retry_history'][-1]})"
    return who


def trial_proposal(ctx: RunContext, trial: optuna.Trial) -> tuple[Strategy, str]:
    """A trial's strategy (a user's edit, or the space's for its params: sampled or enqueued; not yet validated)
    and who proposed it. Optuna 5's Trial has no system_attrs; the stored trial does (enqueued trials carry
    fixed_params)."""
    t = ctx.study.get_trials(deepcopy=False)[trial.number]
    edited = t.user_attrs.get(T_STRATEGY)
    strategy = Strategy(**edited) if edited else ctx.space.suggest(trial)
    return strategy, proposer(ctx.cfg, t)


def evaluated_twin(ff: FrontierFile, strategy: Strategy) -> Optional[Candidate]:
    """The latest candidate evaluated (ok, pruned or failed) with this strategy."""
    key = strategy.key()
    return next((c for c in reversed(ff.candidates)
                 if c.status in ("ok", "pruned", "failed") and c.strategy.key() == key), None)


def propose(ctx: RunContext, trial: optuna.Trial, *, screens_so_far: int = 0,
            in_flight: Optional[Callable[[], list[FrozenTrial]]] = None) -> Proposal:
    """The asked trial's proposal. Its trial is told at once (`closed`) when it repeats an evaluated strategy (told
    that result: the sampler learns, no compute is spent) or the surrogate screens it out (told PRUNED;
    `screens_so_far` caps how many in a row, acf.coordinator.screening.MAX_SCREENS).

    `in_flight` (a shared study: the trials other workers run) also closes a repeat of a strategy running elsewhere,
    marks a told repeat with the candidate it repeats, and marks the trial with its strategy for the others."""
    strategy, proposed_by = trial_proposal(ctx, trial)
    try:
        strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
    except StrategyError as e:
        return Proposal(strategy, proposed_by, rejected=str(e))
    assert ctx.ff is not None
    prev = evaluated_twin(ctx.ff, strategy)
    if prev is not None:
        if in_flight is not None:
            trial.set_user_attr(T_DUPLICATE, prev.id)
        tell(ctx.study, ctx.cfg, trial, prev)
        return Proposal(strategy, proposed_by, closed="repeat")
    key = strategy.key()
    if in_flight is not None:
        for t in in_flight():
            if t.number != trial.number and t.user_attrs.get(T_STRATEGY_KEY) == key:
                close(ctx.study, trial.number, f"duplicate of trial {t.number}, which is running", shared=True)
                return Proposal(strategy, proposed_by, closed="running")
    pred, screened = assess(ctx, trial, strategy, proposed_by, screenable=proposed_by.startswith("optuna"),
                            screens_so_far=screens_so_far)
    if screened is not None:
        return Proposal(strategy, proposed_by, prediction=pred, closed="screened")
    if in_flight is not None:
        trial.set_user_attr(T_STRATEGY_KEY, key)
    return Proposal(strategy, proposed_by, prediction=pred)


# ---- record ------------------------------------------------------------------------------------------------------

def set_constraint(cfg: RunConfig, trial: optuna.Trial, cand: Candidate) -> None:
    """Optuna constraints (feasible when <= 0): task-quality retention and kld, each set on every told trial."""
    if cfg.min_retention is not None:
        ret = cand.retention
        trial.set_constraint("retention", cfg.min_retention - ret if ret is not None else 0.0)
    if cfg.max_kld is not None:
        k = kld_of(cand)
        trial.set_constraint("kld", k - cfg.max_kld if k is not None else 0.0)


def told_state(cfg: RunConfig, cand: Candidate) -> TrialState:
    """The state `tell` leaves a trial in for this candidate."""
    if cand.status == "ok" and len(cand.objectives) == len(cfg.objectives):
        return TrialState.COMPLETE
    return TrialState.PRUNED if cand.status == "pruned" else TrialState.FAIL


def tell(study: optuna.Study, cfg: RunConfig, trial: optuna.Trial, cand: Candidate) -> None:
    """Tell the trial the candidate's outcome: its objective values and constraints when it is ok with a value for
    every objective, PRUNED when the proxy pruned it, FAIL otherwise (the candidate may be an earlier one with the
    same strategy)."""
    state = told_state(cfg, cand)
    if state == TrialState.COMPLETE:
        set_constraint(cfg, trial, cand)
        study.tell(trial, [cand.objectives[o] for o in cfg.objectives])
    else:
        study.tell(trial, state=state)


def record(study: optuna.Study, cfg: RunConfig, cand: Candidate, number: Optional[int], *,
           shared: bool = False) -> Recorded:
    """Score a finished candidate against the run's stored baseline and store it: onto its trial, told with it,
    while that trial runs; a candidate with no running trial of its own (`number` None: a user's edit; or a trial
    closed when validation refused its proposal) goes into the study as an attribute.

    Idempotent: a candidate already stored on its trial (a process killed after recording, before its graph's
    checkpoint or its own bookkeeping) is "already" recorded. In a shared study (`shared`) a trial finished by
    someone else (failed by the heartbeat during a long outage, then retried elsewhere) has its result
    "discarded": the retry counts, nothing is recorded twice."""
    base = baseline_objectives(study)
    if base is not None:
        score(cfg, base, cand)
    if cand.reason:
        cand.reason = cand.reason[:500]
    if number is not None:
        trials = study.get_trials(deepcopy=False)
        t = trials[number]
        if t.state == TrialState.RUNNING:   # also when a killed process wrote the record but had not told yet
            trial = trial_for(study, number)
            try:
                put_trial_record(trial, cand)
                tell(study, cfg, trial, cand)
            except optuna.exceptions.UpdateFinishedTrialError:
                if not shared:
                    raise
                return "discarded"
            return "recorded"
        mine = (t.user_attrs.get(T_RECORD) or {}).get("id") == cand.id
        if shared:
            retried = any(number in o.system_attrs.get("retry_history", []) for o in trials)
            return "already" if mine and t.state == told_state(cfg, cand) and not retried else "discarded"
        if mine:
            return "already"
    return "recorded" if put_loose_record(study, cand) else "already"


# ---- close -------------------------------------------------------------------------------------------------------

def close(study: optuna.Study, number: int, reason: str, *, shared: bool = False) -> None:
    """Close a trial that will not be evaluated as proposed, told FAIL with why (a shared study keeps why under
    its own name: acf.distributed reads it apart from the reasons of evaluated trials). A finished trial is left
    as it is."""
    t = study.get_trials(deepcopy=False)[number]
    if t.state != TrialState.RUNNING:
        return
    tr = trial_for(study, number)
    tr.set_user_attr(T_RELEASED if shared else T_CLOSED, reason[:300] if shared else reason)
    try:
        study.tell(tr, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
