"""Trials that wait for the user while several workers run: proposals are RUNNING trials marked pending; approving
enqueues a WAITING copy that exactly one worker pops. Also `release`, how a shared study closes a trial that will
not run (acf.coordinator.trial.close)."""

from __future__ import annotations

from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from acf.coordinator.episode import approval_request, decide
from acf.coordinator.run_context import RunContext
from acf.core.errors import AcfError, StrategyError
from acf.coordinator.state import Candidate, now
from acf.coordinator.trial import close, record, trial_proposal
from acf.methods.strategy import Strategy, validate_strategy
from acf.distributed.schema import A_STOP, T_APPROVAL, T_PROPOSAL, T_STRATEGY
from acf.distributed.study import cid_for


def release(study: optuna.Study, number: int, reason: str) -> None:
    """Close a trial that will not run (budget, duplicate, approval bookkeeping) without a candidate record."""
    close(study, number, reason, shared=True)


def make_pending(ctx: RunContext, trial: optuna.Trial) -> None:
    """Turn a RUNNING trial into a proposal waiting for approval (no heartbeat: it is never failed as stale)."""
    strategy, proposed_by = trial_proposal(ctx, trial)
    try:
        strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
    except StrategyError as e:
        release(ctx.study, trial.number, f"invalid proposal: {e}")
        return
    trial.set_user_attr(T_PROPOSAL, approval_request(ctx, strategy, proposed_by))
    trial.set_user_attr(T_APPROVAL, "pending")


class ApprovalQueue:
    """Proposals that wait for the user while several workers run (the coordinator's approval view).

    `top_up(n)` keeps n proposals pending; `pending()` lists them like the graph's approval request;
    `answer(number, answer)` takes the graph's answers: approve | skip | stop | {'action': 'edit', 'strategy': ...}.
    """

    def __init__(self, ctx: RunContext):
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
            record(study, ctx.cfg, cand, number, shared=True)   # told FAIL, as a skip
            return "skip"
        if action == "stop":
            study.set_user_attr(A_STOP, "stopped by the user")
            for p in self.pending_trials():
                release(study, p.number, "stopped by the user at approval")
            return "stop"
        raise AssertionError(f"unhandled approval action {action!r}")
