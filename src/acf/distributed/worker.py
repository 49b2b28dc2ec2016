"""One worker process's loop over shared trials: claim a trial, run the episode engine on it, record the result into
the trial (idempotent), until the shared budget is used."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from acf.coordinator.baseline import evaluate_baseline
from acf.coordinator.episode import Episode, run_episode, write_episode_files
from acf.coordinator.run_context import RunConfig, RunContext, RunPaths
from acf.coordinator.run_stages import stop_reason
from acf.coordinator.screening import aim_of, enqueue_aim, waiting_aim
from acf.coordinator.trial import propose, record
from acf.core.errors import AcfError
from acf.coordinator.state import Candidate, FrontierFile, RunMeta, now
from acf.methods.strategy import Strategy
from acf.distributed.approval import make_pending, release
from acf.coordinator.run_store import (A_BASELINE, A_CONFIG, A_RUN_META, A_SPEC, A_STARTED, frontier_from_study,
                                       prune_artifact_dirs, put_baseline)
from acf.distributed.schema import (A_APPROVAL, A_BASELINE_CLAIM, A_STOP, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DB_WAIT,
                                    DEFAULT_GRACE, DEFAULT_HEARTBEAT, T_APPROVAL, T_WORKER)
from acf.distributed.storage import (Beat, fail_stale, first_line, load_study, make_storage, retry_db, study_config,
                                     trial_heartbeat, where)
from acf.distributed.study import cid_for

log = logging.getLogger(__name__)


class SharedPaths(RunPaths):
    """Where a worker's files go, under the shared artifacts folder: <artifacts>/<study>/<cid>/model, so each trial
    has a private parent folder (`compress` cleans partial siblings of its output, which must never be another
    worker's work in progress), and the episode's files next to it."""

    def artifact_dir(self, cid: str) -> Path:
        return self.root / cid / "model"

    def episode_dir(self, episode: int) -> Path:
        return self.root / cid_for(episode)


class WorkerContext(RunContext):
    """A RunContext whose run directory is the shared artifacts folder (`SharedPaths`) and whose frontier comes from
    the study."""

    def __init__(self, cfg: RunConfig, study: optuna.Study, console=None):
        super().__init__(cfg, console, paths=SharedPaths(cfg.run_dir), study=study)


def check_artifacts_dir(path: str | Path) -> Path:
    """The shared artifacts dir must exist (or be creatable) and be writable before any compute is spent."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".acf-write-test-", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise AcfError(f"--artifacts {p}: not a writable directory ({e.strerror or type(e).__name__}); "
                       f"give a folder every worker can write (a shared mount for several machines)") from None
    return p.resolve()


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """One worker process's loop over shared trials. Stops on the shared budget (episodes, time, patience), on a
    user stop, or after `max_episodes` of its own."""

    def __init__(self, storage_url: str, study_name: str, device: Optional[str] = None,
                 artifacts: Optional[str | Path] = None, console=None, heartbeat_interval: int = DEFAULT_HEARTBEAT,
                 grace_period: int = DEFAULT_GRACE, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
                 max_episodes: Optional[int] = None, poll_seconds: float = 2.0, db_wait: float = DEFAULT_DB_WAIT):
        from rich.console import Console

        from acf.models.loading import resolve_device

        self.url, self.name = storage_url, study_name
        self.console = console or Console(stderr=False)
        self.storage = make_storage(storage_url, heartbeat_interval, grace_period, connect_timeout)
        self.study = load_study(self.storage, storage_url, study_name)
        cfg = study_config(self.study)
        art_root = check_artifacts_dir(artifacts or Path("runs") / "artifacts")
        cfg.run_dir = str(art_root / study_name)
        cfg.storage, cfg.study_name = storage_url, study_name
        cfg.device = resolve_device(device or cfg.device)
        # Control rows (baseline + recovery) are measured by the single-process graph only: the study has a place
        # for them (`run_store.put_control`), but several workers would need a claim per recovery, as the
        # baseline has, not to measure the same control twice.
        cfg.controls = False
        # Each worker needs its own sampler seed, or every worker's first random proposals would be identical.
        self.study.sampler = _sampler(cfg, os.getpid())
        self.ctx = WorkerContext(cfg, self.study, self.console)
        self.id = worker_id()
        self.max_episodes = max_episodes
        self.poll = poll_seconds
        self.db_wait = db_wait
        self.grace = grace_period
        self.done = 0
        self.model_path: Optional[str] = None

    # -- storage calls that survive a database restart ------------------------------------------------------------
    def _db(self, fn: Callable[[], Any], what: str) -> Any:
        return retry_db(fn, self.url, f"{what} (worker {self.id})", self.db_wait, self.console)

    # -- setup ---------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        from acf.models.loading import resolve_model
        from acf.models.spec import infer_spec

        cfg = self.ctx.cfg
        self.model_path = str(resolve_model(cfg.model))
        self.ctx.spec = infer_spec(self.model_path, cfg.trust_remote_code)
        self.ctx.dir.mkdir(parents=True, exist_ok=True)
        self.ensure_baseline()

    def ensure_baseline(self) -> Candidate:
        """The baseline is evaluated once per study: the first process to hold the claim evaluates it, others wait.

        The claim is a study attribute with the owner and a heartbeat; it is confirmed by re-reading after a pause
        (last writer wins), and taken over when its heartbeat is older than the grace period."""
        study = self.study
        while True:
            attrs = self._db(lambda: study.user_attrs, "reading the baseline")
            if A_BASELINE in attrs:
                return Candidate.model_validate(attrs[A_BASELINE])
            claim = attrs.get(A_BASELINE_CLAIM)
            if claim is None or time.time() - float(claim.get("heartbeat", 0)) > max(self.grace, 10):
                mine = {"owner": self.id, "heartbeat": time.time()}
                study.set_user_attr(A_BASELINE_CLAIM, mine)
                time.sleep(1.0)
                if study.user_attrs.get(A_BASELINE_CLAIM, {}).get("owner") == self.id:
                    return self._evaluate_baseline()
            time.sleep(self.poll)

    def _evaluate_baseline(self) -> Candidate:
        ctx, study = self.ctx, self.study
        ctx.ff = FrontierFile(run=RunMeta.model_validate(study.user_attrs[A_RUN_META]),
                              spec=study.user_attrs.get(A_SPEC, {}))

        def beat() -> None:
            study.set_user_attr(A_BASELINE_CLAIM, {"owner": self.id, "heartbeat": time.time()})

        with Beat(beat, max(1.0, self.grace / 4), "baseline"):
            cand = evaluate_baseline(ctx, self.model_path)
        self._db(lambda: put_baseline(study, cand), "storing the baseline")
        ctx.ff.baseline = cand
        # the yardstick's recipes, by the worker that measured the baseline (the others start episodes meanwhile)
        from acf.coordinator.yardstick import ensure_recipes

        def refresh() -> None:
            ctx.ff = frontier_from_study(study)

        with Beat(beat, max(1.0, self.grace / 4), "recipes"):
            ensure_recipes(ctx, self.model_path, refresh)
        return cand

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run episodes until the shared budget is used; returns how many this worker recorded."""
        if self.model_path is None:
            self.prepare()
        ctx = self.ctx
        self.console.print(f"[bold]worker {self.id}[/] · study {self.name} at {where(self.url)} · device "
                           f"{ctx.cfg.device} · artifacts {ctx.dir}")
        while self.max_episodes is None or self.done < self.max_episodes:
            self._db(lambda: fail_stale(self.study), "failing stale trials")
            reason = self._db(self.stop_reason, "reading the study")
            if reason:
                self.console.print(f"worker {self.id}: stopping ({reason})")
                break
            got = self._db(self.claim, "asking for a trial")
            if got is None:
                time.sleep(self.poll)
                continue
            trial, prop = got
            with trial_heartbeat(self.study, trial._trial_id):
                self.run_trial(trial, prop)
        return self.done

    def refresh(self) -> FrontierFile:
        self.ctx.ff = frontier_from_study(self.study)
        return self.ctx.ff

    def stop_reason(self) -> Optional[str]:
        attrs = self.study.user_attrs
        if attrs.get(A_STOP):
            return str(attrs[A_STOP])
        cfg = self.ctx.cfg
        cfg.episodes = int(attrs[A_CONFIG].get("episodes", cfg.episodes))  # a coordinator may extend the search
        ff = self.refresh()
        # Episodes in flight elsewhere are not done: while they run this worker waits (`claim` returns None), in
        # case one of them dies and its trial is retried.
        return stop_reason(cfg, ff, time.time() - float(attrs.get(A_STARTED, time.time())))

    def _in_flight(self) -> list:
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if T_WORKER in t.user_attrs and t.user_attrs.get(T_APPROVAL) != "pending"]

    def _in_flight_count(self) -> int:
        return len(self._in_flight())

    def _approved_waiting(self) -> list:
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                if t.user_attrs.get(T_APPROVAL) == "approved"]

    def claim(self) -> Optional[tuple[optuna.Trial, dict]]:
        """Take the next trial (ask, or an approved one in approval mode) and check it fits in the shared budget."""
        study, ctx = self.study, self.ctx
        approval = bool(study.user_attrs.get(A_APPROVAL))
        ff = ctx.ff
        assert ff is not None
        if len(ff.candidates) + self._in_flight_count() >= ctx.cfg.episodes:
            return None  # others are finishing the last episodes
        if approval and not self._approved_waiting():
            return None
        t0 = time.time()
        if not approval and not waiting_aim(study):
            # the single process's aim (acf.coordinator.screening): after the seeds, two of three sampled episodes
            # fix the budget at the recipe size where acf trails most; numbered by what the study holds so far
            self._db(lambda: enqueue_aim(ctx, len(ff.candidates) + self._in_flight_count() + 1), "enqueueing an aim")
        trial = study.ask()
        if approval and trial.user_attrs.get(T_APPROVAL) != "approved":
            # A race handed us an unapproved trial (a seed or a fresh sample): it joins the approval queue instead.
            make_pending(ctx, trial)
            return None
        # Beat at once (a worker killed from here on has its trial failed and retried), then mark it ours.
        storage = study._storage
        if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(T_WORKER, self.id)
        # Budget: the lowest-numbered in-flight trials win when several workers claim at once.
        ahead = [t for t in self._in_flight() if t.number < trial.number]
        if len(ff.candidates) + len(ahead) >= ctx.cfg.episodes:
            release(study, trial.number, "budget: the last episodes are already running")
            return None
        prop = self._strategy_for(trial)
        if prop is None:
            return None
        prop["t_propose"] = round(time.time() - t0, 3)
        prop["aim"] = aim_of(study, trial.number)
        return trial, prop

    def _strategy_for(self, trial: optuna.Trial) -> Optional[dict]:
        """The trial's proposal (`trial.propose`: sampled, enqueued or edited), or None when its trial was closed: a
        strategy validation refuses is recorded as rejected; a repeat (of an evaluated strategy or one running on
        another worker) and a screened-out proposal were told at once."""
        p = propose(self.ctx, trial, in_flight=self._in_flight)
        if p.rejected is not None:
            cand = Candidate(id=cid_for(trial.number), episode=0, trial_number=trial.number, strategy=p.strategy,
                             description=p.strategy.describe(), status="rejected", reason=p.rejected[:500],
                             proposed_by=p.proposed_by, started_at=now(), finished_at=now())
            self.record(trial, cand)
            return None
        if not p.runs:
            return None
        assert p.prediction is not None
        return {"strategy": p.strategy.model_dump(), "proposed_by": p.proposed_by,
                "prediction": p.prediction.model_dump(mode="json")}

    def run_trial(self, trial: optuna.Trial, prop: dict) -> Optional[Candidate]:
        """The episode engine's stages (acf.coordinator.episode.run_episode, as the coordinator graph runs them),
        recorded into the trial (idempotent)."""
        ctx = self.ctx
        cid = cid_for(trial.number)
        strategy = Strategy(**prop["strategy"])
        ctx.say(f"\n[bold cyan]── trial {trial.number}[/] ({self.id}) · proposed by {prop['proposed_by']}: "
                f"{strategy.describe()}")
        ed = ctx.episode_dir(trial.number)

        def sink(cand: Candidate, predictions: Optional[list]) -> bool:
            recorded = self._db(lambda: self.record(trial, cand), f"recording trial {trial.number}")
            if recorded:
                write_episode_files(ed, cand, predictions)
                self.done += 1
                ctx.say(f"  {cid}: {cand.status}" + (f" · {cand.reason}" if cand.reason else ""))
            return recorded

        # episode 0: workers' candidates are numbered when the frontier is rebuilt from the study
        cand, recorded = run_episode(Episode(ctx, cid, trial.number, strategy, str(self.model_path)), sink,
                                     episode=0, trial_number=trial.number, proposed_by=prop["proposed_by"],
                                     t_propose=prop.get("t_propose", 0.0), started_at=now(),
                                     prediction=prop.get("prediction"), aim=prop.get("aim"))
        return cand if recorded else None

    def record(self, trial: optuna.Trial, cand: Candidate) -> bool:
        """Write the candidate into the trial and tell (`trial.record`), only while the trial is still RUNNING.

        Returns False when the trial was finished behind our back (failed by the heartbeat during a long outage and
        retried elsewhere): the result is then discarded, so nothing is recorded twice. A retry of a `record` whose
        tell went through before the connection dropped finds it recorded."""
        got = record(self.study, self.ctx.cfg, cand, trial.number, shared=True)
        if got == "discarded":
            self.ctx.say(f"  [yellow]trial {trial.number} was finished elsewhere[/] (failed by the heartbeat?); "
                         f"its result is discarded, the retry counts")
            if cand.artifact:
                shutil.rmtree(cand.artifact, ignore_errors=True)
            return False
        if got == "recorded" and not self.ctx.cfg.keep_all:
            try:
                prune_artifact_dirs(self.refresh())
            except Exception as e:  # noqa: BLE001 — tidying is best effort; the record is safe
                log.warning("pruning artifacts: %s", first_line(e))
        return True


def _sampler(cfg: RunConfig, salt: int) -> optuna.samplers.BaseSampler:
    from acf.search.space import make_sampler

    return make_sampler(cfg.sampler, (cfg.seed * 1_000_003 + salt) % 2**31, len(cfg.objectives))
