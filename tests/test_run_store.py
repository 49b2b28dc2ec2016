"""The run's store (acf.coordinator.run_store) on an in-memory Optuna study: recording is idempotent across a kill
at any point, and the frontier is derived from the study alone. No model needed."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from acf.coordinator import run_store as RS
from acf.coordinator.pipeline import run_meta
from acf.coordinator.run_context import RunConfig
from acf.coordinator.state import Candidate
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
    RS.put_run(study, cfg, run_meta(cfg, "/models/x", "run"), {"params": 1})
    base = Candidate(id="baseline", episode=0, strategy=Strategy(), proposed_by="baseline",
                     metrics={"kld": _m(0.0), "size": _m(100.0)}, objectives={"kld": 0.0, "size": 100.0})
    RS.put_baseline(study, base)
    return cfg, study


def test_a_record_written_but_not_told_is_told_on_the_redo(tmp_path):
    cfg, study = _study(tmp_path)
    trial = study.ask()
    c = _cand("c001", 1, trial.number, 0.1, 50.0)
    trial.set_user_attr(RS.T_RECORD, c.model_dump(mode="json"))      # killed here: written, never told
    assert RS.frontier_from_study(study).candidates == []
    assert RS.put_record(study, cfg, _cand("c001", 1, trial.number, 0.1, 50.0), trial.number) is True
    assert study.trials[trial.number].state == TrialState.COMPLETE
    assert RS.put_record(study, cfg, _cand("c001", 1, trial.number, 0.1, 50.0), trial.number) is False
    ff = RS.frontier_from_study(study)
    assert [x.id for x in ff.candidates] == ["c001"] and ff.frontier == ["baseline", "c001"]


def test_a_candidate_without_a_running_trial_is_kept_once(tmp_path):
    cfg, study = _study(tmp_path)
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)                           # e.g. replaced by a user edit
    assert RS.put_record(study, cfg, _cand("c001", 1, trial.number, 0.2, 40.0), trial.number) is True
    assert RS.put_record(study, cfg, _cand("c001", 1, trial.number, 0.2, 40.0), trial.number) is False
    assert RS.put_record(study, cfg, _cand("c002", 2, None, 0.05, 60.0), None) is True
    ff = RS.frontier_from_study(study)
    assert [x.id for x in ff.candidates] == ["c001", "c002"] and len(ff.hypervolume) == 3
    assert set(ff.frontier) == {"baseline", "c001", "c002"}


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
        RS.put_record(study, cfg, c, None)
    ff = RS.frontier_from_study(study)
    assert ff.best_fixed_recipe().id == "c002" and "c002" not in ff.frontier and "c003" in ff.frontier
    RS.prune_artifact_dirs(ff)
    assert (tmp_path / "c002").is_dir() and (tmp_path / "c003").is_dir() and not (tmp_path / "c001").exists()
    vs = versus_fixed(ff)
    assert vs["fixed"] == "c002" and vs["pick"] == "c003" and "held_out_ratio" not in vs
    ff.candidate("c002").final_metrics["kld"] = Measurement(value=0.1404, n=300, unit="nats/token")
    ff.candidate("c003").final_metrics["kld"] = Measurement(value=0.0691, n=300, unit="nats/token")
    vs = versus_fixed(ff)
    assert abs(vs["held_out_ratio"] - 0.0691 / 0.1404) < 1e-9 and vs["held_out_n"] == 300
