"""Several workers share one search through Optuna's storage: a real PostgreSQL cluster, real worker processes.

The cluster comes from `tools/pg_test_cluster.sh` (CI starts it and exports ACF_TEST_PG_URL / ACF_TEST_PG_DIR; run
alone, this module starts its own). Tests that need it skip, with the reason, only when it cannot start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from acf.core.errors import AcfError
from acf.search.pareto import pareto_front
from acf.coordinator.run_store import kept_model_ids
from acf.coordinator.state import load_frontier_file
from test_pipeline import cfg_for, quiet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "pg_test_cluster.sh"
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


@pytest.fixture(scope="session")
def pg() -> dict:
    """{'url', 'dir'}: the CI cluster when exported, else a throwaway one started here (and stopped at the end)."""
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install 'acf[distributed]'")
    if os.environ.get("ACF_TEST_PG_URL"):
        yield {"url": os.environ["ACF_TEST_PG_URL"], "dir": os.environ.get("ACF_TEST_PG_DIR")}
        return
    r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"no PostgreSQL test cluster: {SCRIPT.name} start failed: {(r.stderr or r.stdout)[-300:]}")
    env = dict(line.split(" ", 1)[1].split("=", 1) for line in r.stdout.splitlines() if line.startswith("export "))
    try:
        yield {"url": env["ACF_TEST_PG_URL"], "dir": env["ACF_TEST_PG_DIR"]}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env={**os.environ, "ACF_TEST_PG_DIR": env["ACF_TEST_PG_DIR"]},
                       capture_output=True, timeout=120)


def _study_trials(url: str, name: str) -> list:
    from acf.distributed import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=None)).get_trials()


def _wait(pred, timeout: float, what: str, procs=()) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker ended early (exit {p.returncode}) while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _running_of(url: str, name: str, pid: int) -> list:
    return [t for t in _study_trials(url, name) if t.state == optuna.trial.TrialState.RUNNING
            and str(t.user_attrs.get("acf_worker", "")).endswith(f":{pid}")]


def _check_records(url: str, name: str, ff) -> None:
    """Every candidate is one finished trial; ids and trial numbers unique; the frontier is the Pareto set."""
    trials = _study_trials(url, name)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    ids = [c.id for c in ff.candidates]
    nums = [c.trial_number for c in ff.candidates]
    assert len(set(ids)) == len(ids) and len(set(nums)) == len(nums)
    by_num = {t.number: t for t in trials}
    for c in ff.candidates:
        t = by_num[c.trial_number]
        assert t.state in DONE and t.user_attrs["acf_record"]["id"] == c.id
    ok = {c.id: c.objectives for c in [ff.baseline] + ff.candidates if c.status == "ok"}
    assert ff.frontier == pareto_front(ok, ff.run.objectives)
    assert ff.recommended is not None and ff.recommended.id in ff.frontier


# ---- bad inputs (fast, in process) -----------------------------------------------------------------------------

def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_database_fails_fast_naming_host_and_port(pg, capsys):
    from acf.distributed import make_storage
    from test_evaluation import acf_inproc

    port = _free_port()
    t0 = time.time()
    with pytest.raises(AcfError, match=f"cannot reach the study database at 127.0.0.1:{port}"):
        make_storage(f"postgresql://acf@127.0.0.1:{port}/nope")
    assert time.time() - t0 < 10
    # a server that accepts and never answers: the connect timeout ends it, no endless retry
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    t0 = time.time()
    with pytest.raises(AcfError, match=r"127\.0\.0\.1:\d+ .*timeout"):
        make_storage(f"postgresql://acf@127.0.0.1:{srv.getsockname()[1]}/x", connect_timeout=2)
    assert time.time() - t0 < 15
    srv.close()
    code, err = acf_inproc(capsys, "worker", "--storage", f"postgresql://acf@127.0.0.1:{port}/x", "--study", "s")
    assert code == 2 and f"127.0.0.1:{port}" in err and "Traceback" not in err
    with pytest.raises(AcfError, match="not a database URL"):
        make_storage("postgres-at-my-host")
    with pytest.raises(AcfError, match="does not exist"):
        make_storage("journal:///no/such/dir/study.log")


def test_bad_artifacts_other_model_and_missing_study(pg, tiny_model_dir, data_root, tmp_path):
    from acf.distributed import Worker, check_artifacts_dir, create_or_join, make_storage

    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(AcfError, match="--artifacts .*not a writable directory"):
        check_artifacts_dir(f / "sub")
    name = f"s-{uuid.uuid4().hex[:8]}"
    with pytest.raises(AcfError, match=f"no study '{name}'"):
        Worker(pg["url"], name, device="cpu", artifacts=tmp_path / "art", console=quiet())
    storage = make_storage(pg["url"])
    create_or_join(cfg_for(tiny_model_dir, tmp_path / "r1", storage=pg["url"], study_name=name), storage)
    other = tmp_path / "same-weights-other-name"
    other.symlink_to(tiny_model_dir)
    with pytest.raises(AcfError, match="was made for model=.*refusing to mix"):
        create_or_join(cfg_for(other, tmp_path / "r2", storage=pg["url"], study_name=name), storage)
    with pytest.raises(AcfError, match="was made for dataset=gsm8k"):
        create_or_join(cfg_for(tiny_model_dir, tmp_path / "r3", storage=pg["url"], study_name=name,
                               dataset="commonsenseqa", objectives=["answer_nll", "size"]), storage)
    with pytest.raises(AcfError, match="--artifacts"):
        Worker(pg["url"], name, device="cpu", artifacts=f / "sub", console=quiet())


def test_second_coordinator_refused_then_takes_over_a_stale_lock(pg, tiny_model_dir, data_root, tmp_path):
    from acf.distributed import Coordinator

    name = f"lock-{uuid.uuid4().hex[:8]}"
    c1 = Coordinator(cfg_for(tiny_model_dir, tmp_path / "a", storage=pg["url"], study_name=name), console=quiet(),
                     lock_timeout=3)
    c1.acquire()
    c2 = Coordinator(cfg_for(tiny_model_dir, tmp_path / "b", storage=pg["url"], study_name=name), console=quiet(),
                     lock_timeout=3)
    with pytest.raises(AcfError, match=r"already has a coordinator: .*:\d+ \(heartbeat"):
        c2.acquire()
    c1._lock_beat.__exit__()  # c1 "dies": its lock heartbeat stops without releasing
    c1._lock_beat = None
    time.sleep(3.5)
    c2.acquire()                # stale: taken over
    with pytest.raises(AcfError, match="already has a coordinator"):
        c1.acquire()
    c2.release_lock()
    c1.acquire()                # released cleanly: free at once
    c1.release_lock()


# ---- several worker processes on PostgreSQL ---------------------------------------------------------------------

def test_two_workers_share_a_postgres_study_through_kill_and_db_restart(pg, tiny_model_dir, data_root, tmp_path):
    """Two worker processes; one is SIGKILLed mid-trial (its trial is failed by the heartbeat and retried once) and
    the database restarts mid-run (the other worker and the coordinator reconnect); nothing runs or records twice."""
    from acf.distributed import Coordinator, rebuild_frontier

    name = f"two-{uuid.uuid4().hex[:8]}"
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=3, storage=pg["url"], study_name=name)
    coord = Coordinator(cfg, console=quiet(), heartbeat_interval=1, grace_period=4)
    coord.setup()
    try:
        coord.start_workers(2, tmp_path / "artifacts")
        victim = coord.procs[0]
        # a trial the victim runs an episode for: claimed, past the duplicate check and its prediction's screening
        # (a screened proposal is RUNNING only for a moment, then PRUNED), read from the same query
        seen: list = []

        def episode_running() -> bool:
            seen[:] = [t for t in _running_of(pg["url"], name, victim.pid) if "acf_strategy_key" in t.user_attrs]
            return bool(seen)

        _wait(episode_running, 240, "worker-0 to run a trial", coord.procs)
        killed = seen[0].number
        time.sleep(1.0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if pg["dir"]:
            r = subprocess.run(["bash", str(SCRIPT), "restart"], env={**os.environ, "ACF_TEST_PG_DIR": pg["dir"]},
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
        ff = coord.serve(refresh_seconds=1)
    finally:
        coord.stop_workers()
        coord.release_lock()
    log1 = (tmp_path / "run" / "workers" / "worker-1.log").read_text(errors="replace")
    assert coord.procs[1].returncode == 0, log1[-3000:]
    assert len(ff.candidates) == 3 and ff.run.stopped_because == "episodes: 3 done"
    _check_records(pg["url"], name, ff)
    trials = {t.number: t for t in _study_trials(pg["url"], name)}
    assert trials[killed].state == optuna.trial.TrialState.FAIL and "acf_record" not in trials[killed].user_attrs
    retries = [t for t in trials.values() if t.system_attrs.get("retry_history") == [killed]]
    assert len(retries) == 1 and retries[0].number in {c.trial_number for c in ff.candidates}
    assert "retry of trial" in next(c for c in ff.candidates if c.trial_number == retries[0].number).proposed_by
    # frontier.json is what any process rebuilds from the study alone
    on_disk = load_frontier_file(tmp_path / "run" / "frontier.json")
    again = rebuild_frontier(pg["url"], name, tmp_path / "rebuilt")
    assert on_disk.frontier == again.frontier == ff.frontier
    assert [c.id for c in on_disk.candidates] == [c.id for c in again.candidates]
    # only frontier members and the headline's models keep their model (which candidate is acf's best at the
    # recipe's size depends on which worker finished first)
    kept = kept_model_ids(on_disk)
    for c in on_disk.candidates:
        assert (c.artifact is not None and Path(c.artifact).is_dir()) == (c.status == "ok" and c.id in kept)


# ---- journal file: no database ---------------------------------------------------------------------------------

def test_journal_storage_two_workers_kill_and_retry(tiny_model_dir, data_root, tmp_path):
    """A journal file on one machine: a worker process killed with SIGKILL has its trial failed by the journal
    heartbeat and retried once by the other (in-process) worker."""
    from acf.distributed import Worker, create_or_join, make_storage

    url = f"journal://{tmp_path / 'study.log'}"
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=2, storage=url, study_name="j")
    create_or_join(cfg, make_storage(url, 1, 3))
    w = Worker(url, "j", device="cpu", artifacts=tmp_path / "art", console=quiet(), heartbeat_interval=1,
               grace_period=3, poll_seconds=0.5)
    w.prepare()  # the baseline, once per study: the process below finds it
    p = subprocess.Popen([sys.executable, "-m", "acf.cli.main", "worker", "--storage", url, "--study", "j", "--device",
                          "cpu", "--artifacts", str(tmp_path / "art"), "--heartbeat-interval", "1",
                          "--grace-period", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        seen: list = []

        def episode_running() -> bool:   # as in the PostgreSQL test: past screening, read from the same query
            seen[:] = [t for t in _running_of(url, "j", p.pid) if "acf_strategy_key" in t.user_attrs]
            return bool(seen)

        _wait(episode_running, 180, "the worker process to run a trial", [p])
        killed = seen[0].number
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert w.run() >= 1
    ff = w.refresh()
    assert len(ff.candidates) == 2
    _check_records(url, "j", ff)
    trials = {t.number: t for t in _study_trials(url, "j")}
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("retry_history") == [killed]]
    assert len(retries) == 1 and retries[0].user_attrs["acf_record"]["trial_number"] == retries[0].number


# ---- approvals with several workers (Python API) ---------------------------------------------------------------

def test_workers_take_only_approved_trials(tiny_model_dir, data_root, tmp_path):
    from acf.distributed import Coordinator, Worker, trial_heartbeat

    url = f"journal://{tmp_path / 'study.log'}"
    cfg = cfg_for(tiny_model_dir, tmp_path / "run", episodes=3, storage=url, study_name="ap", interactive=True)
    coord = Coordinator(cfg, console=quiet())
    coord.setup()
    try:
        w = Worker(url, "ap", device="cpu", artifacts=tmp_path / "art", console=quiet(), poll_seconds=0.2)
        w.prepare()
        assert w.stop_reason() is None and w.claim() is None          # nothing approved: nothing taken
        coord.rebuild()
        q = coord.queue
        assert q.top_up(2, coord.budget_left()) == 2
        pend = q.pending()
        assert {"strategy", "describe", "proposed_by", "estimate", "trial"} <= set(pend[0])
        assert w.stop_reason() is None and w.claim() is None          # pending is not approved
        assert q.answer(pend[0]["trial"], "approve") == "approve"
        assert q.answer(pend[1]["trial"], "skip") == "skip"
        w.stop_reason()
        trial, prop = w.claim()
        assert prop["strategy"] == pend[0]["strategy"] and trial.number != pend[0]["trial"]
        with trial_heartbeat(w.study, trial._trial_id):
            w.run_trial(trial, prop)
        coord.rebuild()
        q.top_up(1, coord.budget_left())
        (p3,) = q.pending()
        bad = {"action": "edit", "strategy": {"steps": [{"method": "rtn", "params": {"group_size": 48}}]}}
        assert q.answer(p3["trial"], bad).startswith("reask")
        edit = {"action": "edit", "strategy": '{"steps": [{"method": "rtn", "params": {"bits": 8}}]}'}
        assert q.answer(p3["trial"], edit) == "edit"
        assert w.run() == 2                       # its 2nd episode: the edited trial; then the budget is used
        ff = coord.finish()
    finally:
        coord.release_lock()
    assert [c.status for c in ff.candidates][0] == "skipped" and len(ff.candidates) == 3
    ran = [c for c in ff.candidates if c.status != "skipped"]
    assert ran[0].strategy.model_dump() == pend[0]["strategy"]
    assert ran[1].proposed_by.startswith("user edit of") and ran[1].strategy.steps[0].params["bits"] == 8
    _check_records(url, "ap", ff)
    assert not q.pending()
