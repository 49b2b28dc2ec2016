"""The coordinator end to end on a tiny random-init Llama: episodes, approvals, resume after kill -9, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from acf.core.errors import AcfError, RunDirError
from acf.search.pareto import pareto_front
from acf.coordinator.run_context import RunConfig
from acf.coordinator.single_process import Pipeline, run_in_terminal
from acf.coordinator.run_store import kept_model_ids
from acf.coordinator.state import load_frontier_file

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(objectives=["answer_nll", "size"], limit=4, proxy_limit=None, calib_samples=4, seq_len=64,
            recover_steps=[2], tune_steps=[2], latency_tokens=4, min_retention=None,
            quant_methods=["none", "rtn", "bnb_int8"], prune_methods=["none", "magnitude", "drop_layers"],
            skip_sanity=True,   # a random-init model is broken by design (the check: test_architectures.py)
            recipes=["rtn_w4g64"],   # the yardstick, narrowed to its cheapest recipe (test_yardstick.py: the rest)
            controls=False)     # control rows have their own test (test_pipeline_fidelity.py)


def cfg_for(model_dir: Path, run_dir: Path, **kw) -> RunConfig:
    args = dict(FAST)
    args.update(kw)
    return RunConfig(model=str(model_dir), run_dir=str(run_dir), **args)


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


@pytest.fixture(scope="module")
def e2e_run(tiny_model_dir, data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    run_in_terminal(cfg_for(tiny_model_dir, run_dir, episodes=3), quiet())
    return run_dir


def test_three_episodes_give_a_valid_frontier(e2e_run):
    ff = load_frontier_file(e2e_run / "frontier.json")
    assert ff.schema_version == 1 and ff.baseline is not None
    assert [c.id for c in ff.candidates] == ["c001", "c002", "c003"]
    assert ff.run.acf_version and ff.run.objectives == ["answer_nll", "size"]
    ok = {c.id: c.objectives for c in [ff.baseline] + ff.candidates if c.status == "ok"}
    assert ff.frontier == pareto_front(ok, ["answer_nll", "size"])
    assert len(ff.hypervolume) >= 3 and ff.recommended is not None and ff.recommended.id in ff.frontier
    for c in ff.candidates:
        ed = e2e_run / "episodes" / f"{c.episode:03d}"
        assert (ed / "strategy.json").is_file() and (ed / "result.json").is_file()
        if c.status == "ok":
            assert c.metrics["size"].how == "measured" and c.metrics["answer_nll"].n == 4
            assert all(s.wall_seconds > 0 and s.log_path for s in c.steps)
            # only frontier members (and the headline's models) keep their model
            assert (c.artifact is not None and Path(c.artifact).is_dir()) == (c.id in kept_model_ids(ff))
            # the prediction made before it ran travels with it (size at least: too few points for kld here)
            assert c.prediction is not None and c.prediction.size and c.prediction.how
            assert "latency" not in c.objectives and "latency" not in c.metrics   # not ranked; on a CPU not measured
        else:
            assert c.reason
    st = optuna.load_study(study_name=ff.run.study_name, storage=f"sqlite:///{e2e_run / 'study.db'}")
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in st.trials)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials) >= \
        sum(c.status == "ok" for c in ff.candidates)


def test_resume_refusals(e2e_run, tmp_path, tiny_model_dir):
    from acf.coordinator.single_process import load_run_config

    with pytest.raises(RunDirError, match="not an acf run"):
        load_run_config(tmp_path)
    with pytest.raises(RunDirError, match="already holds a run"):
        Pipeline(cfg_for(tiny_model_dir, e2e_run, episodes=1), quiet())
    # corrupt frontier.json: derived from the study, so it is set aside (named, kept verbatim) and rebuilt
    bad = tmp_path / "bad"
    shutil.copytree(e2e_run, bad, ignore=shutil.ignore_patterns("artifacts"))
    (bad / "frontier.json").write_text("{ not json")
    cfg = load_run_config(bad)
    cfg.run_dir = str(bad)
    buf = io.StringIO()
    Pipeline(cfg, Console(file=buf, width=300), resume=True).close()
    assert "frontier.json: corrupt" in buf.getvalue() and "rebuilt from the study" in buf.getvalue()
    assert (bad / "frontier.json.corrupt").read_text() == "{ not json"
    rebuilt, orig = load_frontier_file(bad / "frontier.json"), load_frontier_file(e2e_run / "frontier.json")
    assert [c.id for c in rebuilt.candidates] == [c.id for c in orig.candidates] and rebuilt.frontier == orig.frontier
    # a run from before the study held results, with a corrupt frontier.json: refused, file untouched
    (bad / "study.db").unlink()
    (bad / "frontier.json").write_text("{ not json")
    with pytest.raises(RunDirError, match="frontier.json: corrupt"):
        Pipeline(cfg, quiet(), resume=True)
    assert (bad / "frontier.json").read_text() == "{ not json" and not (bad / "study.db").exists()
    # corrupt study.db
    bad2 = tmp_path / "bad2"
    shutil.copytree(e2e_run, bad2, ignore=shutil.ignore_patterns("artifacts"))
    (bad2 / "study.db").write_bytes(b"this is not a database" * 100)
    cfg = load_run_config(bad2)
    cfg.run_dir = str(bad2)
    with pytest.raises(RunDirError, match="study.db: corrupt"):
        Pipeline(cfg, quiet(), resume=True)


def test_resume_other_model_refused(e2e_run, capsys):
    from test_evaluation import acf_inproc

    code, err = acf_inproc(capsys, "run", "--resume", str(e2e_run), "--model", "smollm2-135m-other")
    # the alias default is allowed (no --model given); another model is refused
    assert code == 2 and "that run is for model" in err


def test_interactive_approval_via_api(tiny_model_dir, data_root, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=4, interactive=True)
    pipe = Pipeline(cfg, quiet())
    req = pipe.start()
    assert req["episode"] == 1 and set(req["choices"]) == {"approve", "edit", "skip", "stop"}
    assert "estimated_compress_seconds" in req["estimate"] and "strategy" in req
    req = pipe.resume("approve")                          # episode 1 runs
    assert req["episode"] == 2
    req = pipe.resume({"action": "edit", "strategy": {"steps": [{"method": "rtn", "params": {"group_size": 128}}]}})
    assert req["episode"] == 2 and "group_size 128" in req["note"]   # invalid edit: asked again with the reason
    req = pipe.resume({"action": "edit", "strategy": '{"steps": [{"method": "rtn", "params": {"bits": 8}}]}'})
    assert req["episode"] == 3                             # the edited strategy ran as episode 2
    req = pipe.resume("skip")
    assert req["episode"] == 4
    assert pipe.resume("stop") is None
    pipe.close()
    ff = load_frontier_file(tmp_path / "run" / "frontier.json")
    assert [c.status for c in ff.candidates][1:] == ["ok", "skipped"]
    assert ff.candidates[1].strategy.steps[0].method == "rtn" and ff.candidates[1].strategy.steps[0].params["bits"] == 8
    assert ff.candidates[1].proposed_by.startswith("user edit")
    assert ff.run.stopped_because == "stopped by the user"
    st = optuna.load_study(study_name=ff.run.study_name, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in st.trials)


def test_preflight_refuses_when_disk_is_short(tiny_model_dir, data_root, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=1, min_free_disk_bytes=2**60)
    ctx = run_in_terminal(cfg, quiet())
    c = ctx.ff.candidates[0]
    assert c.status == "rejected" and "disk" in c.reason and "GiB free" in c.reason


def test_every_method_failing_is_recorded(tiny_model_dir, data_root, tmp_path, monkeypatch):
    """A GSM8K folder whose train split is empty: the run is refused at the start (nothing could calibrate); past
    that check (data gone after the start), every calibrated method fails and the run still completes."""
    from acf.core.errors import DataError
    import acf.coordinator.single_process as single_process

    data = tmp_path / "gsm8k"
    data.mkdir()
    src = Path(os.environ["ACF_DATA_DIR"]) / "gsm8k" / "test.jsonl"
    data.joinpath("test.jsonl").write_text("".join(src.read_text().splitlines(True)[:8]))
    data.joinpath("train.jsonl").write_text("")
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=2, data_dir=str(data), quant_methods=["gptq"],
                  prune_methods=["none"])
    with pytest.raises(DataError, match="calibration .* cannot be filled"):
        run_in_terminal(cfg.model_copy(), quiet())
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(single_process, "check_calibration", lambda cfg, path: None)
    ctx = run_in_terminal(cfg, quiet())
    assert [c.status for c in ctx.ff.candidates] == ["failed", "failed"]
    assert all(c.reason for c in ctx.ff.candidates)
    assert ctx.ff.frontier == ["baseline"]


def _wait_for(pred, timeout: float, proc) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_the_study_is_the_runs_store(e2e_run, tmp_path, capsys):
    """frontier.json is derived from the study alone: rebuilt the same (`acf rebuild-frontier --run-dir`), and a run whose
    frontier.json was lost resumes with every episode it recorded."""
    from acf.coordinator.run_context import RunContext
    from acf.coordinator.run_store import frontier_from_study, open_run
    from acf.coordinator.single_process import load_run_config
    from test_evaluation import acf_inproc

    ff = load_frontier_file(e2e_run / "frontier.json")
    run = tmp_path / "copy"
    shutil.copytree(e2e_run, run)
    (run / "frontier.json").unlink()
    st = optuna.load_study(study_name=ff.run.study_name, storage=f"sqlite:///{run / 'study.db'}")
    same = {"run": {"updated_at", "run_id"}}     # the run id is its folder's name
    assert frontier_from_study(st, e2e_run.name).model_dump(exclude=same) == ff.model_dump(exclude=same)
    code, err = acf_inproc(capsys, "rebuild-frontier", "--run-dir", str(run))
    assert code == 0, err
    assert load_frontier_file(run / "frontier.json").model_dump(exclude=same) == ff.model_dump(exclude=same)
    # a run from before the study held its results (frontier.json was the store) is adopted into its study
    old = tmp_path / "old"
    shutil.copytree(e2e_run, old, ignore=shutil.ignore_patterns("study.db"))
    cfg = load_run_config(old)
    cfg.run_dir = str(old)
    wall = {"run": {"updated_at", "run_id", "wall_seconds"}}   # opening it counts its own (tiny) wall time
    assert open_run(RunContext(cfg, quiet())).model_dump(exclude=wall) == ff.model_dump(exclude=wall)
    (run / "frontier.json").unlink()
    cfg = load_run_config(run)
    cfg.run_dir, cfg.episodes = str(run), 4
    cfg.keep_all = True     # the copy's records name the original run's models: never delete those
    pipe = Pipeline(cfg, quiet(), resume=True)
    assert pipe.start() is None
    pipe.close()
    again = load_frontier_file(run / "frontier.json")
    assert [c.id for c in again.candidates] == ["c001", "c002", "c003", "c004"]
    differ = {k for a, b in zip(again.candidates, ff.candidates) for k, v in a.model_dump().items()
              if v != b.model_dump()[k]}
    assert differ <= {"artifact_kept"}
    assert again.baseline == ff.baseline and again.run.stopped_because == "episodes: 4 done"


def _run_cmd(model_dir: Path, run_dir: Path, episodes: int) -> list[str]:
    return [sys.executable, str(ROOT / "run_pipeline.py"), "--model", str(model_dir), "--episodes", str(episodes),
            "--run-dir", str(run_dir), "--objectives", "answer_nll,size", "--limit", "4", "--proxy-limit", "2",
            "--calib-samples", "4", "--seq-len", "64", "--min-retention", "0.01", "--seed", "3",
            "--skip-sanity", "--recipes", "rtn_w4g64"]


def test_kill_9_mid_episode_then_resume(tiny_model_dir, data_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(_run_cmd(tiny_model_dir, run_dir, 3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env)
    # kill while episode 2 is being compressed or evaluated (episode 1 already recorded)
    _wait_for(lambda: (run_dir / "episodes" / "001" / "result.json").exists() and
              any((run_dir / "artifacts").glob("*c002*")), 240, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ff = load_frontier_file(run_dir / "frontier.json")
    assert [c.id for c in ff.candidates] == ["c001"]
    r = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--resume", str(run_dir)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ff = load_frontier_file(run_dir / "frontier.json")
    assert [c.id for c in ff.candidates] == ["c001", "c002", "c003"]      # exactly N, nothing duplicated
    ok = {c.id: c.objectives for c in [ff.baseline] + ff.candidates if c.status == "ok"}
    assert ff.frontier == pareto_front(ok, ff.run.objectives)
    assert not list((run_dir / "artifacts").glob(".tmp-*"))
    kept = {d.name for d in (run_dir / "artifacts").iterdir()}
    # kept off the frontier too: acf's best at each recipe size (the report measures it held out); the recipes' own
    # models live in the recipe cache, not in the run
    headline = {i for i in ff.headline_ids() if not i.startswith("r:")}
    assert kept == {c for c in ff.frontier if c != "baseline"} | headline
    assert [r.id for r in ff.recipes] == ["r:rtn_w4g64"] and ff.recipes[0].status == "ok"
    st = optuna.load_study(study_name=ff.run.study_name, storage=f"sqlite:///{run_dir / 'study.db'}")
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in st.trials)


def test_ctrl_c_stops_cleanly_and_resumes(tiny_model_dir, data_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The run gets Ctrl-C's default disposition back: a pytest-xdist worker ignores SIGINT, a child inherits that
    # (Python then installs no KeyboardInterrupt handler) and the run would finish instead of stopping (seen in a
    # clean-clone CI; reproduced by ignoring SIGINT in the parent)
    p = subprocess.Popen(_run_cmd(tiny_model_dir, run_dir, 2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: (run_dir / "frontier.json").exists() and
              load_frontier_file(run_dir / "frontier.json").baseline is not None, 240, p)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-2000:]
    # the run's own directory, not a placeholder (it said `acf run --resume RUN_DIR`)
    assert f"continue with `acf run --resume {run_dir}`" in out and "RUN_DIR" not in out, out[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--resume", str(run_dir)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [c.id for c in load_frontier_file(run_dir / "frontier.json").candidates] == ["c001", "c002"]


def test_interactive_in_a_pseudo_terminal(tiny_model_dir, data_root, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    cmd = _run_cmd(tiny_model_dir, tmp_path / "run", 2) + ["--interactive"]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=300, env={**os.environ, "COLUMNS": "160"})
    child.expect("approve / edit / skip / stop")
    child.sendline("edit")
    child.expect("new strategy JSON")
    child.sendline('{"steps": [{"method": "rtn", "params": {"bits": 8, "group_size": 32}}]}')
    child.expect("approve / edit / skip / stop")    # episode 2
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    ff = load_frontier_file(tmp_path / "run" / "frontier.json")
    assert len(ff.candidates) == 1 and ff.candidates[0].strategy.steps[0].params["group_size"] == 32
