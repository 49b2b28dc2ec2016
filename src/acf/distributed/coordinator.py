"""The coordinator of a shared study (`acf run --workers K`): holds the study's lock, creates or joins the study,
starts local workers, serves approvals and rebuilds frontier.json from the study."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from acf.core.objectives import DIRECTIONS
from acf.coordinator.run_context import RunConfig, RunContext, make_run_dir, task_for, validate_config
from acf.core.errors import AcfError
from acf.coordinator.run_store import A_STOPPED, publish
from acf.coordinator.state import FrontierFile
from acf.distributed.approval import ApprovalQueue, release
from acf.distributed.processes import spawn_workers, stop_processes
from acf.distributed.schema import (A_COORDINATOR, A_STOP, DEFAULT_CONNECT_TIMEOUT, DEFAULT_GRACE, DEFAULT_HEARTBEAT,
                                    T_APPROVAL, T_WORKER)
from acf.distributed.storage import Beat, first_line, make_storage, quiet_optuna, retry_db, study_config, where
from acf.distributed.study import create_or_join
from acf.distributed.worker import check_artifacts_dir, worker_id

log = logging.getLogger(__name__)


class Coordinator:
    """Owns frontier.json for a shared study: holds the study's coordinator lock, creates/joins the study, starts
    local workers, serves approvals, and rebuilds frontier.json from the study periodically and at the end."""

    def __init__(self, cfg: RunConfig, storage_url: Optional[str] = None, console=None,
                 lock_timeout: float = 60.0, heartbeat_interval: int = DEFAULT_HEARTBEAT,
                 grace_period: int = DEFAULT_GRACE, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT):
        from rich.console import Console

        from acf.models.loading import resolve_device

        self.console = console or Console(stderr=False)
        validate_config(cfg, task_for(cfg).metrics)
        cfg.device = resolve_device(cfg.device)
        run_dir = make_run_dir(cfg.run_dir)
        self.url = storage_url or cfg.storage or f"journal://{run_dir.resolve() / 'study.log'}"
        cfg.storage = self.url
        self.cfg = cfg
        self.lock_timeout = lock_timeout
        self.hb, self.grace, self.connect_timeout = heartbeat_interval, grace_period, connect_timeout
        self.storage = make_storage(self.url, heartbeat_interval, grace_period, connect_timeout)
        self.token = uuid.uuid4().hex
        self.owner = worker_id()
        self.procs: list[subprocess.Popen] = []
        self._lock_beat: Optional[Beat] = None
        self.study: Optional[optuna.Study] = None
        self.ctx: Optional[RunContext] = None
        self.queue: Optional[ApprovalQueue] = None

    # -- lock ----------------------------------------------------------------------------------------------------
    def _lock_study(self) -> optuna.Study:
        """A study handle for the lock before the study's config exists (creates an empty study if needed)."""
        quiet_optuna()
        return optuna.create_study(storage=self.storage, study_name=self.cfg.study(), load_if_exists=True,
                                   directions=[DIRECTIONS[o] for o in self.cfg.objectives])

    def acquire(self) -> None:
        """Refuse when another live coordinator holds the study; take over a lock whose heartbeat is stale."""
        try:
            study = self._lock_study()
        except ValueError as e:
            raise AcfError(f"study {self.cfg.study()!r} at {where(self.url)} does not match this run: {e}") from None
        cur = study.user_attrs.get(A_COORDINATOR)
        if cur and cur.get("token") != self.token:
            age = time.time() - float(cur.get("heartbeat", 0))
            if age < self.lock_timeout:
                raise AcfError(f"study {self.cfg.study()!r} already has a coordinator: {cur.get('owner')} "
                               f"(heartbeat {age:.0f} s ago); stop it, or wait {self.lock_timeout - age:.0f} s for "
                               f"its lock to go stale if it died")
            self.console.print(f"[yellow]taking over[/] the coordinator lock of {cur.get('owner')} "
                               f"(no heartbeat for {age:.0f} s)")
        study.set_user_attr(A_COORDINATOR, self._lock_value())
        time.sleep(1.0)
        cur = study.user_attrs.get(A_COORDINATOR) or {}
        if cur.get("token") != self.token:
            raise AcfError(f"study {self.cfg.study()!r}: another coordinator ({cur.get('owner')}) took the lock at "
                           f"the same moment; refusing")

        def beat() -> None:
            now_ = study.user_attrs.get(A_COORDINATOR) or {}
            if now_.get("token") not in (None, self.token):
                log.error("coordinator lock taken over by %s", now_.get("owner"))
                return
            study.set_user_attr(A_COORDINATOR, self._lock_value())

        self._lock_beat = Beat(beat, max(1.0, self.lock_timeout / 4), "coordinator-lock").__enter__()

    def _lock_value(self) -> dict:
        return {"owner": self.owner, "token": self.token, "heartbeat": time.time()}

    def release_lock(self) -> None:
        if self._lock_beat is not None:
            self._lock_beat.__exit__()
            self._lock_beat = None
        try:
            st = self._lock_study()
            if (st.user_attrs.get(A_COORDINATOR) or {}).get("token") == self.token:
                st.set_user_attr(A_COORDINATOR, None)
        except Exception as e:  # noqa: BLE001 — a stale lock is taken over after lock_timeout anyway
            log.warning("releasing the coordinator lock: %s", first_line(e))

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> optuna.Study:
        """Lock, then create or join the study; returns it."""
        self.acquire()
        try:
            study, _, spec = create_or_join(self.cfg, self.storage, approval=self.cfg.interactive,
                                            console=self.console)
        except BaseException:
            self.release_lock()
            raise
        self.study = study
        from acf.core.atomic import write_text

        write_text(Path(self.cfg.run_dir) / "run_config.json", self.cfg.model_dump_json(indent=2))
        from acf.models.spec import save_spec

        save_spec(spec, Path(self.cfg.run_dir) / "model_spec.json")
        self.ctx = RunContext(self.cfg, self.console, study=study, spec=spec)
        self.queue = ApprovalQueue(self.ctx)
        return study

    def rebuild(self) -> FrontierFile:
        assert self.study is not None
        ff = publish(self.study, self.cfg.run_dir, prune=not self.cfg.keep_all)
        if self.ctx is not None:
            self.ctx.ff = ff
        return ff

    def start_workers(self, k: int, artifacts: Path, extra: Optional[list[str]] = None) -> None:
        """K local worker processes: one per visible GPU (CUDA_VISIBLE_DEVICES each), or K on CPU."""
        self.procs += spawn_workers(k, self.url, self.cfg.study(), self.cfg.device, self.cfg.run_dir, artifacts,
                                    self.hb, self.grace, self.console, extra)

    def budget_left(self) -> int:
        assert self.study is not None and self.ctx is not None and self.ctx.ff is not None
        running = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if T_WORKER in t.user_attrs and t.user_attrs.get(T_APPROVAL) != "pending"]
        return study_config(self.study).episodes - len(self.ctx.ff.candidates) - len(running)

    def finished(self) -> bool:
        """Local workers all exited; or, with none, the budget is used and nothing runs."""
        if self.procs:
            return all(p.poll() is not None for p in self.procs)
        assert self.study is not None
        running = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if T_WORKER in t.user_attrs and t.user_attrs.get(T_APPROVAL) != "pending"]
        if running:
            return False
        if self.study.user_attrs.get(A_STOP):
            return True
        ff = self.ctx.ff if self.ctx else None
        return ff is not None and len(ff.candidates) >= study_config(self.study).episodes

    def serve(self, ask: Optional[Callable[[dict], Any]] = None, refresh_seconds: float = 5.0,
              n_pending: int = 1) -> FrontierFile:
        """Rebuild frontier.json every `refresh_seconds` until the work is done; serve approvals through `ask`."""
        assert self.study is not None
        seen = 0
        while True:
            ff = retry_db(self.rebuild, self.url, "rebuilding frontier.json", console=self.console)
            if len(ff.candidates) != seen:
                for c in ff.candidates[seen:]:
                    on = " · on the frontier" if c.id in ff.frontier else ""
                    self.console.print(f"  {c.id}: {c.status}{on} · {c.description}"
                                       + (f" · {c.reason}" if c.reason and c.status != "ok" else ""))
                seen = len(ff.candidates)
            if retry_db(self.finished, self.url, "checking the workers", console=self.console):
                break
            if self.cfg.interactive:
                retry_db(lambda: self._approvals(ask, n_pending), self.url, "serving approvals", console=self.console)
            time.sleep(refresh_seconds)
        return retry_db(self.finish, self.url, "finishing", console=self.console)

    def _approvals(self, ask: Optional[Callable[[dict], Any]], n_pending: int) -> None:
        assert self.study is not None and self.queue is not None
        if self.study.user_attrs.get(A_STOP):
            return
        self.queue.top_up(n_pending, self.budget_left())
        if ask is not None:
            for req in self.queue.pending():
                self.queue.answer(req["trial"], ask(req))
                if self.study.user_attrs.get(A_STOP):
                    break

    def finish(self) -> FrontierFile:
        assert self.study is not None
        if self.queue is not None:
            for p in self.queue.pending_trials():
                release(self.study, p.number, "the search ended")
        ff = self.rebuild()
        reason = self.study.user_attrs.get(A_STOP) or (f"episodes: {ff.run.episodes} done"
                                                       if len(ff.candidates) >= ff.run.episodes else None)
        bad = [(i, p.returncode) for i, p in enumerate(self.procs) if p.returncode not in (0, None)]
        if bad and not reason:
            reason = "workers failed: " + ", ".join(f"worker-{i} exit {rc}" for i, rc in bad)
        if reason:
            self.study.set_user_attr(A_STOPPED, reason)
        ff = self.rebuild()
        return ff

    def stop_workers(self) -> None:
        stop_processes(self.procs)


def run_coordinator(cfg: RunConfig, workers: int, artifacts: Optional[Path] = None, console=None,
                    ask: Optional[Callable[[dict], Any]] = None, resume: bool = False,
                    refresh_seconds: float = 5.0) -> FrontierFile:
    """`acf run --workers K`: the coordinator plus K local workers sharing one study (K=0: workers elsewhere)."""
    from acf.coordinator.single_process import ask_terminal

    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "run_config.json").exists():
        from acf.core.errors import RunDirError

        raise RunDirError(f"{run_dir} already holds a run: use --resume {run_dir} or another --run-dir")
    if resume and (run_dir / "checkpoints.db").exists():
        raise AcfError(f"--resume {run_dir}: that run was made by the single-process graph; resume it without "
                       f"--workers (its frontier.json is not in a shared study)")
    if workers < 0:
        raise AcfError(f"--workers must be 0 or more (got {workers})")
    coord = Coordinator(cfg, console=console)
    art = check_artifacts_dir(artifacts or run_dir / "artifacts")
    coord.setup()
    if cfg.interactive and ask is None:
        ask = lambda r: ask_terminal({**r, "episode": r["trial"], "frontier": []}, coord.console)  # noqa: E731
    try:
        coord.start_workers(workers, art)
        ff = coord.serve(ask=ask, refresh_seconds=refresh_seconds, n_pending=max(1, workers))
    except KeyboardInterrupt:
        coord.stop_workers()
        coord.rebuild()
        raise
    finally:
        coord.stop_workers()
        coord.release_lock()
    failed = [i for i, p in enumerate(coord.procs) if p.returncode not in (0, None)]
    if failed:
        tail = (run_dir / "workers" / f"worker-{failed[0]}.log").read_text(errors="replace").strip().splitlines()[-3:]
        coord.console.print(f"[red]worker(s) {failed} failed[/]; last lines of worker-{failed[0]}.log: "
                            + " | ".join(tail))
    return ff
