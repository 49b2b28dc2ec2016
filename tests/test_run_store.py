"""The run's store (acf.coordinator.run_store) on an in-memory Optuna study: recording is idempotent across a kill
at any point, and the frontier is derived from the study alone. No model needed."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from acf.coordinator import run_store
from acf.coordinator.run_stages import run_meta
from acf.coordinator.run_context import RunConfig
from acf.coordinator.state import Candidate
from acf.coordinator.trial import close, record
from acf.core.provenance import Measurement
from acf.methods.strategy import Strategy, Step


def _m(v: float, unit: str = "") -> Measurement:
    return Measurement(value=v, unit=unit, device="cpu", method="test")


def _cand(cid: str, episode: int, trial: int, kld: float, size: float) -> Candidate:
    s = Strategy(steps=[Step(method="rtn", params={"bits": 4, "group_size": 64})])
    return Candidate(id=cid, episode=episode, trial_number=trial, strategy=s, description=s.describe(),
                     metrics={"kld": _m(kld, "nats/token"), "size": _m(size, "bytes")})


def _study(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run"), objectives=["kld", "size"], min_retention=None, episodes=2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    run_store.put_run(study, cfg, run_meta(cfg, "/models/x", "run"), {"params": 1})
    base = Candidate(id="baseline", episode=0, strategy=Strategy(), proposed_by="baseline",
                     metrics={"kld": _m(0.0), "size": _m(100.0)}, objectives={"kld": 0.0, "size": 100.0})
    run_store.put_baseline(study, base)
    return cfg, study


def test_a_record_written_but_not_told_is_told_on_the_redo(tmp_path):
    cfg, study = _study(tmp_path)
    trial = study.ask()
    c = _cand("c001", 1, trial.number, 0.1, 50.0)
    trial.set_user_attr(run_store.T_RECORD, c.model_dump(mode="json"))      # killed here: written, never told
    assert run_store.frontier_from_study(study).candidates == []
    assert record(study, cfg, _cand("c001", 1, trial.number, 0.1, 50.0), trial.number) == "recorded"
    assert study.trials[trial.number].state == TrialState.COMPLETE
    assert record(study, cfg, _cand("c001", 1, trial.number, 0.1, 50.0), trial.number) == "already"
    ff = run_store.frontier_from_study(study)
    assert [x.id for x in ff.candidates] == ["c001"] and ff.frontier == ["baseline", "c001"]


def test_a_candidate_without_a_running_trial_is_kept_once(tmp_path):
    cfg, study = _study(tmp_path)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)                           # e.g. replaced by a user edit
    assert record(study, cfg, _cand("c001", 1, trial.number, 0.2, 40.0), trial.number) == "recorded"
    assert record(study, cfg, _cand("c001", 1, trial.number, 0.2, 40.0), trial.number) == "already"
    assert record(study, cfg, _cand("c002", 2, None, 0.05, 60.0), None) == "recorded"
    ff = run_store.frontier_from_study(study)
    assert [x.id for x in ff.candidates] == ["c001", "c002"] and len(ff.hypervolume) == 3
    assert set(ff.frontier) == {"baseline", "c001", "c002"}


def test_a_workers_record_is_discarded_when_its_trial_was_finished_elsewhere(tmp_path):
    """A shared study's trial failed by the heartbeat (then retried elsewhere) takes no late record; a record whose
    tell went through is found recorded when the worker retries it; a released trial says why."""
    cfg, study = _study(tmp_path)
    lost, mine, spare = study.ask(), study.ask(), study.ask()
    study.tell(lost, state=TrialState.FAIL)                            # failed by the heartbeat
    assert record(study, cfg, _cand("t000", 0, lost.number, 0.1, 50.0), lost.number, shared=True) == "discarded"
    c = _cand("t001", 0, mine.number, 0.1, 50.0)
    assert record(study, cfg, c, mine.number, shared=True) == "recorded"
    assert record(study, cfg, c, mine.number, shared=True) == "already"
    close(study, spare.number, "budget: the last episodes are already running", shared=True)
    assert study.trials[spare.number].state == TrialState.FAIL
    assert study.trials[spare.number].user_attrs[run_store.T_RELEASED].startswith("budget")
    assert [x.id for x in run_store.frontier_from_study(study).candidates] == ["t001"]


def test_the_best_fixed_recipe_is_kept_off_the_frontier_and_compared_held_out(tmp_path):
    """The report compares the pick with the best fixed recipe (GPTQ W4 seeds, not acf's allocations): its model
    survives pruning though dominated, so the final evaluation can measure it on the held-out items, and the
    report's sentence then quotes the held-out ratio too."""
    from acf.reports.report import versus_fixed

    def seed(cid: str, params: dict, kld: float, size: float) -> Candidate:
        c = _cand(cid, int(cid[1:]), int(cid[1:]), kld, size)
        c.strategy = Strategy(steps=[Step(method="gptq", params=params)])
        c.proposed_by = "seed recipe"
        return c

    cfg, study = _study(tmp_path)
    plain = seed("c001", {"bits": 4, "group_size": 64}, 0.22, 50.0)
    ao = seed("c002", {"bits": 4, "group_size": 64, "act_order": True}, 0.14, 50.0)
    mixed = seed("c003", {"avg_bits": 4.25, "act_order": True}, 0.07, 49.9)    # acf's allocation: no fixed recipe
    for i, c in enumerate((plain, ao, mixed)):
        c.artifact = str(tmp_path / c.id)
        (tmp_path / c.id).mkdir()
        record(study, cfg, c, None)
    ff = run_store.frontier_from_study(study)
    assert ff.best_fixed_recipe().id == "c002" and "c002" not in ff.frontier and "c003" in ff.frontier
    run_store.prune_artifact_dirs(ff)
    assert (tmp_path / "c002").is_dir() and (tmp_path / "c003").is_dir() and not (tmp_path / "c001").exists()
    vs = versus_fixed(ff)
    assert vs["fixed"] == "c002" and vs["pick"] == "c003" and "held_out_ratio" not in vs
    ff.candidate("c002").final_metrics["kld"] = Measurement(value=0.1404, n=300, unit="nats/token")
    ff.candidate("c003").final_metrics["kld"] = Measurement(value=0.0691, n=300, unit="nats/token")
    vs = versus_fixed(ff)
    assert abs(vs["held_out_ratio"] - 0.0691 / 0.1404) < 1e-9 and vs["held_out_n"] == 300


def test_the_search_stops_on_its_episodes_or_its_time_budget(tmp_path):
    """stop_reason takes the wall time so far from its caller: a single process's (stored + since its last store),
    a shared study's (since the study started)."""
    from acf.coordinator.run_stages import stop_reason

    cfg, study = _study(tmp_path)
    ff = run_store.frontier_from_study(study)
    assert stop_reason(cfg, ff, 1e9) is None                                # no budget: time never stops it
    cfg.budget_minutes = 1.0
    assert stop_reason(cfg, ff, 59.0) is None
    assert stop_reason(cfg, ff, 60.0) == "time budget of 1 min used"
    for i in (1, 2):
        record(study, cfg, _cand(f"c00{i}", i, None, 0.1 * i, 50.0), None)
    assert stop_reason(cfg, run_store.frontier_from_study(study), 0.0) == "episodes: 2 done"
