"""Trials that wait for the user while several workers run: proposals are RUNNING trials marked pending; approving
enqueues a WAITING copy that exactly one worker pops. Also `release`, which closes a trial that will not run."""

from __future__ import annotations

from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from acf.search.space import trial_for
from acf.coordinator import run_context as RC
from acf.core.errors import AcfError, StrategyError
from acf.coordinator.state import Candidate, now
from acf.methods.strategy import Strategy, validate_strategy
from acf.coordinator.run_store import write_trial_record
from acf.distributed.schema import A_STOP, T_APPROVAL, T_PROPOSAL, T_RELEASED, T_STRATEGY
from acf.distributed.study import cid_for


def _proposer(ctx: RC.RunContext, system_attrs: dict) -> str:
    """Like `pipeline._proposer`, which cannot see system attrs through Optuna 5's Trial."""
    if system_attrs.get("fixed_params"):
        return "seed recipe" if ctx.cfg.sampler != "grid" else "preset grid"
    return f"optuna:{ctx.cfg.sampler}"


def release(study: optuna.Study, number: int, reason: str) -> None:
    """Close a trial that will not run (budget, duplicate, approval bookkeeping) without a candidate record."""
    t = study.get_trials(deepcopy=False)[number]
    if t.state == TrialState.RUNNING:
        tr = trial_for(study, number)
        tr.set_user_attr(T_RELEASED, reason[:300])
        try:
            study.tell(tr, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def trial_proposal(ctx: RC.RunContext, trial: optuna.Trial) -> tuple[Strategy, str]:
    """A trial's strategy (an edited one, or the space's for its params: sampled or enqueued; not yet validated)
    and who proposed it."""
    ua = trial.user_attrs
    sa = ctx.study._storage.get_trial(trial._trial_id).system_attrs
    proposed_by = (ua.get(T_PROPOSAL) or {}).get("proposed_by") or _proposer(ctx, sa)
    if "retry_history" in sa:
        proposed_by += f" (retry of trial {sa['retry_history'][-1]})"
    strategy = Strategy(**ua[T_STRATEGY]) if ua.get(T_STRATEGY) else ctx.space.suggest(trial)
    return strategy, proposed_by


def make_pending(ctx: RC.RunContext, trial: optuna.Trial) -> None:
    """Turn a RUNNING trial into a proposal waiting for approval (no heartbeat: it is never failed as stale)."""
    strategy, proposed_by = trial_proposal(ctx, trial)
    try:
        strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
    except StrategyError as e:
        release(ctx.study, trial.number, f"invalid proposal: {e}")
        return
    from acf.coordinator.episode import approval_request

    trial.set_user_attr(T_PROPOSAL, approval_request(ctx, strategy, proposed_by))
    trial.set_user_attr(T_APPROVAL, "pending")


class ApprovalQueue:
    """Proposals that wait for the user while several workers run (the coordinator's approval view).

    `top_up(n)` keeps n proposals pending; `pending()` lists them like the graph's approval request;
    `answer(number, answer)` takes the graph's answers: approve | skip | stop | {'action': 'edit', 'strategy': ...}.
    """

    def __init__(self, ctx: RC.RunContext):
        self.ctx = ctx

    @property
    def study(self) -> optuna.Study:
        return self.ctx.study

    def pending_trials(self) -> list:
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get(T_APPROVAL) == "pending"]

    def pending(self) -> list[dict]:
        out = []
        for t in self.pending_trials():
            p = dict(t.user_attrs[T_PROPOSAL])
            p.update(trial=t.number, choices=["approve", "edit", "skip", "stop"])
            out.append(p)
        return out

    def top_up(self, n: int, budget_left: Optional[int] = None) -> int:
        """Ask the sampler for proposals until n are pending (or the budget has no room). Returns how many pend."""
        study = self.study
        have = len(self.pending_trials())
        waiting_ok = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                      if t.user_attrs.get(T_APPROVAL) == "approved"]
        room = n - have
        if budget_left is not None:
            room = min(room, budget_left - have - len(waiting_ok))
        for _ in range(max(0, room)):
            if waiting_ok:
                break  # asking now would pop an approved trial meant for a worker
            trial = study.ask()
            if trial.user_attrs.get(T_APPROVAL) == "approved":  # a retry raced in: give it back to the workers
                study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs))
                release(study, trial.number, "requeued for the workers")
                break
            make_pending(self.ctx, trial)
        return len(self.pending_trials())

    def answer(self, number: int, answer: Any) -> str:
        """Apply the user's answer to pending trial `number`; returns the decision taken."""
        from acf.coordinator.episode import decide

        study, ctx = self.study, self.ctx
        t = study.get_trials(deepcopy=False)[number]
        if t.state != TrialState.RUNNING or t.user_attrs.get(T_APPROVAL) != "pending":
            raise AcfError(f"trial {number} is not waiting for approval")
        prop = t.user_attrs[T_PROPOSAL]
        action, new, note = decide(ctx, answer)
        if action == "reask":
            return f"reask: {note}"
        if action == "approve":
            ua = {T_APPROVAL: "approved", T_PROPOSAL: prop, "acf_approved_from": number}
            study.enqueue_trial(dict(t.params), user_attrs=ua)
            release(study, number, "approved: moved to a queued trial")
            return "approve"
        if action == "edit":
            assert new is not None
            p2 = {**prop, "strategy": new.model_dump(), "describe": new.describe(),
                  "proposed_by": "user edit of " + prop["proposed_by"]}
            study.enqueue_trial({}, user_attrs={T_APPROVAL: "approved", T_PROPOSAL: p2,
                                                T_STRATEGY: new.model_dump(), "acf_approved_from": number})
            release(study, number, "replaced by a user edit")
            return "edit"
        if action == "skip":
            s = Strategy(**prop["strategy"])
            cand = Candidate(id=cid_for(number), episode=0, trial_number=number, strategy=s, description=s.describe(),
                             status="skipped", reason="skipped by the user at approval",
                             proposed_by=prop["proposed_by"], started_at=now(), finished_at=now())
            write_trial_record(study, self.ctx.cfg, number, cand)   # told FAIL, as a skip
            return "skip"
        if action == "stop":
            study.set_user_attr(A_STOP, "stopped by the user")
            for p in self.pending_trials():
                release(study, p.number, "stopped by the user at approval")
            return "stop"
        raise AssertionError(f"unhandled approval action {action!r}")
