"""A trial's proposal (acf.coordinator.trial.propose), the one the single-process graph and the workers share, on an
in-memory study: a repeat of an evaluated strategy is told that result at once, a strategy running on another
worker is not run twice, a user's edit keeps what the user was shown, a strategy validation refuses comes back
rejected with its trial open. Recording and closing are in test_run_store.py."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from acf.coordinator.run_context import RunConfig, space_for
from acf.coordinator.run_store import T_DUPLICATE, T_PROPOSAL, T_RELEASED, T_STRATEGY, T_STRATEGY_KEY
from acf.coordinator.state import Candidate, FrontierFile, RunMeta
from acf.coordinator.trial import propose
from acf.core.provenance import Measurement
from acf.methods.strategy import Strategy


def _ctx(tiny_model_dir, tmp_path):
    from acf.models.spec import infer_spec

    spec = infer_spec(tiny_model_dir)
    cfg = RunConfig(run_dir=str(tmp_path / "run"), objectives=["kld", "size"], min_retention=None)
    meta = RunMeta(run_id="r", model="m", model_path="/m", dataset="gsm8k", objectives=cfg.objectives,
                   directions={}, preset="balanced", min_retention=None, sampler="tpe", seed=0, limit=4,
                   proxy_limit=None, episodes=4, device="cpu", acf_version="0", git_commit=None, runtime="t",
                   created_at="", updated_at="")
    base = Candidate(id="baseline", episode=0, strategy=Strategy(), proposed_by="baseline", objectives={"kld": 0.0, "size": 1e6},
                     metrics={"kld": Measurement(value=0.0), "size": Measurement(value=1e6, unit="bytes")})
    ff = FrontierFile(run=meta, spec={}, baseline=base)
    study = optuna.create_study(directions=["minimize", "minimize"])
    return SimpleNamespace(cfg=cfg, spec=spec, space=space_for(cfg, spec), study=study, ff=ff, say=lambda m: None)


def test_a_repeat_is_told_the_earlier_result_and_a_running_twin_is_closed(tiny_model_dir, tmp_path):
    ctx = _ctx(tiny_model_dir, tmp_path)
    seed = ctx.space.seeds()[0]
    ctx.study.enqueue_trial(seed)
    first = ctx.study.ask()
    p = propose(ctx, first)
    assert p.runs and p.proposed_by == "seed recipe" and p.prediction is not None
    # another worker runs it: the same strategy is not run twice (its trial closed, the reason kept)
    ctx.study.enqueue_trial(seed)
    twin = ctx.study.ask()
    first.set_user_attr(T_STRATEGY_KEY, p.strategy.key())
    running = [t for t in ctx.study.get_trials(deepcopy=False) if t.number == first.number]
    q = propose(ctx, twin, in_flight=lambda: running)
    assert q.closed == "running"
    t = ctx.study.get_trials(deepcopy=False)[twin.number]
    assert t.state == TrialState.FAIL and t.user_attrs[T_RELEASED].startswith(f"duplicate of trial {first.number}")
    # once evaluated, a repeat is told its result: the sampler learns, nothing runs
    ctx.ff.candidates.append(Candidate(id="c001", episode=1, strategy=p.strategy, status="ok",
                                       objectives={"kld": 0.1, "size": 5e5}))
    for in_flight in (None, lambda: []):
        ctx.study.enqueue_trial(seed)
        again = ctx.study.ask()
        r = propose(ctx, again, in_flight=in_flight)
        t = ctx.study.get_trials(deepcopy=False)[again.number]
        assert r.closed == "repeat" and t.state == TrialState.COMPLETE and t.values == [0.1, 5e5]
        # a shared study marks which candidate it repeats; a single process's study stays as it was
        assert (T_DUPLICATE in t.user_attrs) == (in_flight is not None)


def test_a_users_edit_is_proposed_as_shown_and_an_invalid_one_is_rejected_with_its_trial_open(tiny_model_dir,
                                                                                               tmp_path):
    ctx = _ctx(tiny_model_dir, tmp_path)
    edit = [{"method": "rtn", "params": {"bits": 8, "group_size": None}}]
    ctx.study.enqueue_trial({}, user_attrs={T_STRATEGY: {"steps": edit},
                                            T_PROPOSAL: {"proposed_by": "user edit of optuna:tpe"}})
    p = propose(ctx, ctx.study.ask())
    assert p.runs and p.proposed_by == "user edit of optuna:tpe" and p.strategy.steps[0].method == "rtn"
    bad = [{"method": "rtn", "params": {"bits": 4, "group_size": 7}}]      # no such group size on this model
    ctx.study.enqueue_trial({}, user_attrs={T_STRATEGY: {"steps": bad}})
    trial = ctx.study.ask()
    r = propose(ctx, trial)
    assert r.rejected and not r.runs
    assert ctx.study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING
