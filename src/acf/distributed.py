"""Several workers share one search through Optuna's storage (issue 9). No scheduler: the storage is the queue.

Each episode is one Optuna trial: a worker asks (or takes an approved proposal), builds the strategy, runs
preflight → compress → proxy/full evaluation with the episode engine the coordinator graph runs too
(`acf.episode.run_episode`), then writes the whole candidate record into the trial's user attributes and tells the
study. Everything a frontier needs therefore lives in the
study (config, spec summary and baseline as study attributes; one record per trial), so any process can rebuild
frontier.json from the storage alone (`rebuild_frontier`).

Why these choices:
* Workers are killed (preemption, OOM, SIGKILL). Each running trial carries a heartbeat; before asking, every
  worker fails trials whose heartbeat went stale and Optuna's `RetryHeartbeatStaleTrialCallback` re-enqueues them
  once. Optuna only heartbeats inside `Study.optimize`, so we run the heartbeat thread ourselves around each
  ask/tell episode. Optuna 5's JournalStorage has no heartbeat; `HeartbeatJournalStorage` adds one through a trial
  system attribute so the same code path (Optuna's `fail_stale_trials`) works without a database.
* Telling is idempotent: the record is written and the trial told only while it is still RUNNING, so a trial that
  was failed behind our back (database outage longer than the grace period, then retried elsewhere) is never
  recorded twice.
* Approval with several workers: proposals are RUNNING trials marked `approval: pending` (no heartbeat, so never
  failed as stale). Approving enqueues a WAITING copy with the same parameters (`approval: approved`); Optuna's
  WAITING→RUNNING pop is atomic in every storage, so two workers can never take the same approved trial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import optuna
import typer
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from . import pipeline as P
from .errors import AcfError, StrategyError
from .state import Candidate, FrontierFile, RunMeta, now, save_frontier_file
from .strategy import Strategy, validate_strategy

log = logging.getLogger(__name__)

# study user attributes
A_CONFIG = "acf_config"            # RunConfig of the search (what every worker must run)
A_RUN_META = "acf_run_meta"        # RunMeta for the rebuilt frontier.json
A_SPEC = "acf_spec"                # model spec summary
A_STARTED = "acf_started_at"       # epoch seconds: the time budget counts from here
A_BASELINE = "acf_baseline"        # baseline Candidate record
A_BASELINE_CLAIM = "acf_baseline_claim"
A_COORDINATOR = "acf_coordinator"  # the coordinator lock {owner, token, heartbeat}
A_APPROVAL = "acf_approval"        # True: workers take only approved trials
A_STOP = "acf_stop"                # set to a reason: workers stop at their next episode boundary
A_STOPPED = "acf_stopped_because"
# trial user attributes
T_RECORD = "acf_record"            # the Candidate record (JSON)
T_WORKER = "acf_worker"            # who runs the trial
T_APPROVAL = "approval"            # pending | approved
T_PROPOSAL = "acf_proposal"        # {strategy, proposed_by, describe, estimate} shown at approval
T_STRATEGY = "acf_strategy"        # an edited strategy that replaces the sampled one
T_RELEASED = "acf_released"        # why a trial was closed without an episode (budget, duplicate, approval moves)
T_DUPLICATE = "acf_duplicate_of"
HB_ATTR = "acf_heartbeat"          # journal heartbeat (trial system attribute)

DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 30
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_DB_WAIT = 120.0


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed to be used with Study.optimize.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


# ---- storage ---------------------------------------------------------------------------------------------------

class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """JournalStorage with the heartbeat Optuna 5 gives only to RDBStorage.

    The heartbeat is a trial system attribute holding the writer's wall clock; staleness compares it with the
    reader's clock, which is right for a journal file on one machine (or a shared file system with synced clocks).
    """

    def __init__(self, path: str, heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None,
                 heartbeat_stale_trial_callback: Optional[Callable] = None):
        from optuna.storages.journal import JournalFileBackend

        super().__init__(JournalFileBackend(path))
        self.path = path
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HB_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told a moment ago; the beat thread is being stopped

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * (self.heartbeat_interval or DEFAULT_HEARTBEAT)
        t = time.time()
        return [tr._trial_id for tr in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if HB_ATTR in tr.system_attrs and t - float(tr.system_attrs[HB_ATTR]) > grace]

    def get_heartbeat_interval(self) -> Optional[int]:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Optional[Callable]:
        return self.heartbeat_stale_trial_callback


def journal_path(url: str) -> Optional[str]:
    """`journal:///abs/path`, `journal://rel/path` or a plain path ending in .log name a journal file."""
    if url.startswith("journal://"):
        return url[len("journal://"):]
    if "://" not in url and url.endswith(".log"):
        return url
    return None


def where(url: str) -> str:
    """host:port (or the file) of a storage URL, for error messages; never the password."""
    jp = journal_path(url)
    if jp is not None:
        return jp
    if url.startswith("sqlite"):
        return url.split(":///", 1)[-1]
    parts = urlsplit(url)
    port = parts.port or {"postgresql": 5432, "mysql": 3306}.get(parts.scheme.split("+")[0], "")
    return f"{parts.hostname or 'localhost'}:{port}"


def make_storage(url: str, heartbeat_interval: Optional[int] = DEFAULT_HEARTBEAT,
                 grace_period: Optional[int] = DEFAULT_GRACE, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
                 max_retry: int = 1) -> BaseStorage:
    """Open a storage with heartbeats and one retry of trials whose worker died; fail fast when it is unreachable."""
    _quiet_optuna()
    cb = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None
    jp = journal_path(url)
    if jp is not None:
        p = Path(jp)
        if not p.parent.is_dir():
            raise AcfError(f"journal storage {jp}: directory {p.parent} does not exist")
        try:
            return HeartbeatJournalStorage(str(p), heartbeat_interval, grace_period, cb)
        except OSError as e:
            raise AcfError(f"journal storage {jp}: cannot open ({e.strerror or e})") from None
    if "://" not in url:
        raise AcfError(f"storage {url!r}: not a database URL (postgresql://user@host:port/db, sqlite:///file.db) "
                       f"nor a journal file (journal:///path/study.log or *.log)")
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        url = _postgres_driver(url)
        scheme = url.split("://", 1)[0]
    kw: dict[str, Any] = {"pool_pre_ping": True}
    if scheme.startswith("postgresql"):
        kw["connect_args"] = {"connect_timeout": connect_timeout}
    elif scheme.startswith("mysql"):
        kw["connect_args"] = {"connect_timeout": connect_timeout}
    elif scheme.startswith("sqlite"):
        kw["connect_args"] = {"timeout": 60}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period, heartbeat_stale_trial_callback=cb)
    except ImportError:
        raise AcfError(f"storage {scheme}://{where(url)}: the database driver is not installed "
                       f"(PostgreSQL: pip install 'acf[distributed]', i.e. psycopg2-binary)") from None
    except Exception as e:  # sqlalchemy OperationalError, optuna StorageInternalError: one line, host and port
        raise AcfError(f"cannot reach the study database at {where(url)} ({_first_line(e)}); "
                       f"gave up after the {connect_timeout} s connect timeout") from None


def _postgres_driver(url: str) -> str:
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; acf's `distributed` extra installs psycopg2-binary.
    Use whichever driver is installed (psycopg 3 first), so the plain URL works with either."""
    import importlib.util

    rest = url.split("://", 1)[1]
    if importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + rest
    if importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + rest
    return "postgresql://" + rest


def _first_line(e: BaseException) -> str:
    s = str(getattr(e, "orig", None) or e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def _is_db_error(e: BaseException) -> bool:
    try:
        import sqlalchemy.exc

        if isinstance(e, sqlalchemy.exc.SQLAlchemyError):
            return True
    except ImportError:
        pass
    return isinstance(e, (optuna.exceptions.StorageInternalError, OSError))


def retry_db(fn: Callable[[], Any], url: str, what: str, wait: float = DEFAULT_DB_WAIT, console=None) -> Any:
    """Retry a storage call while the database is down (restart, failover), up to `wait` seconds, then fail with
    one line naming host and port. Errors that are not about reaching the database are raised at once."""
    t0 = time.time()
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if not _is_db_error(e) or isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
                raise
            if time.time() - t0 > wait:
                raise AcfError(f"the study database at {where(url)} stayed unreachable for {wait:.0f} s while "
                               f"{what} ({_first_line(e)}); stopping") from None
            msg = f"database unreachable at {where(url)} while {what} ({_first_line(e)}); retrying"
            if console is not None:
                console.print(f"[yellow]{msg}[/]")
            else:
                log.warning(msg)
            time.sleep(2.0)


def load_study(storage: BaseStorage, url: str, study_name: str) -> optuna.Study:
    """Join an existing study made by `acf run --workers` (it holds the search's config)."""
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    except Exception as e:
        if _is_db_error(e):
            raise AcfError(f"cannot read studies at {where(url)} ({_first_line(e)})") from None
        raise
    if study_name not in names:
        raise AcfError(f"no study {study_name!r} at {where(url)} (it has: {', '.join(names) or 'none'}); create it with "
                       f"`acf run --storage URL --study {study_name} --workers 0 ...`")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if A_CONFIG not in study.user_attrs:
        raise AcfError(f"study {study_name!r} at {where(url)} was not made by `acf run --workers` (no acf config); "
                       f"refusing to join")
    return study


def study_config(study: optuna.Study) -> P.RunConfig:
    return P.RunConfig.model_validate(study.user_attrs[A_CONFIG])


# ---- heartbeats ------------------------------------------------------------------------------------------------

class Beat:
    """Call `fn` every `interval` seconds in a daemon thread until stopped; errors (database down) are logged and
    retried, so a short outage does not kill the heartbeat for the rest of the episode."""

    def __init__(self, fn: Callable[[], None], interval: float, what: str):
        self.fn, self.interval, self.what = fn, interval, what
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name=f"beat-{what}")

    def _run(self) -> None:
        while True:
            try:
                self.fn()
            except Exception as e:  # noqa: BLE001 — a heartbeat must outlive transient storage errors
                log.warning("heartbeat %s: %s", self.what, _first_line(e))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "Beat":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join(timeout=30)


def trial_heartbeat(study: optuna.Study, trial_id: int) -> Beat:
    storage = study._storage
    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) else None
    if not interval:
        return Beat(lambda: None, 3600, "none")
    return Beat(lambda: storage.record_heartbeat(trial_id), interval, f"trial-{trial_id}")


def fail_stale(study: optuna.Study) -> None:
    """Fail trials whose worker stopped beating; the storage's callback re-enqueues each once."""
    storage = study._storage
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval():
        optuna.storages.fail_stale_trials(study)


# ---- the shared study ------------------------------------------------------------------------------------------

def create_or_join(cfg: P.RunConfig, storage: BaseStorage, approval: bool = False,
                   console=None) -> tuple[optuna.Study, str, Any]:
    """Create the shared study (config, spec, run metadata, seed recipes) or join it; refuse a study made for
    another model/task/objectives (`open_study`). Returns (study, resolved model path, model spec)."""
    from . import __version__
    from .models import resolve_model
    from .provenance import device_string, git_commit, runtime_string
    from .spec import infer_spec, spec_summary

    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "objectives": cfg.objectives}
    study = P.open_study(storage, cfg.study(), cfg.objectives, cfg.sampler, cfg.seed, meta)  # type: ignore[arg-type]
    attrs = study.user_attrs
    if A_CONFIG not in attrs:
        shared = cfg.model_copy(update={"storage": None, "interactive": False, "planner": None})
        study.set_user_attr(A_CONFIG, json.loads(shared.model_dump_json()))
        study.set_user_attr(A_SPEC, json.loads(json.dumps(spec_summary(spec))))
        study.set_user_attr(A_STARTED, time.time())
        rm = RunMeta(run_id=cfg.study(), model=cfg.model, model_path=str(model_path), dataset=cfg.dataset,
                     objectives=cfg.objectives, directions={o: P.DIRECTIONS[o] for o in cfg.objectives},
                     preset=cfg.preset, min_retention=cfg.min_retention, sampler=cfg.sampler, seed=cfg.seed,
                     limit=cfg.limit, proxy_limit=cfg.proxy_limit, episodes=cfg.episodes, device=cfg.device,
                     device_name=device_string(cfg.device), acf_version=__version__, git_commit=git_commit(),
                     runtime=runtime_string(), created_at=now(), updated_at=now(), command=cfg.command,
                     study_name=cfg.study(), storage=P._redact(cfg.storage_url()))
        study.set_user_attr(A_RUN_META, json.loads(rm.model_dump_json()))
    else:
        old = study_config(study)
        if old.episodes != cfg.episodes:  # joining with a larger --episodes extends the search, like --resume
            study.set_user_attr(A_CONFIG, {**attrs[A_CONFIG], "episodes": max(old.episodes, cfg.episodes)})
    study.set_user_attr(A_APPROVAL, bool(approval))
    if not study.trials:
        ctx = SimpleNamespace(cfg=cfg, spec=spec)
        from .search import SearchSpace

        space = _space(ctx.cfg, spec, SearchSpace)
        for p in space.seeds() if cfg.sampler != "grid" else space.grid():
            study.enqueue_trial(p, skip_if_exists=True)
    return study, str(model_path), spec


def _space(cfg: P.RunConfig, spec, SearchSpace) -> Any:
    kw = {}
    if cfg.quant_methods:
        kw["quant_methods"] = cfg.quant_methods
    if cfg.prune_methods:
        kw["prune_methods"] = cfg.prune_methods
    return SearchSpace(spec, cfg.device, cfg.calib_samples, cfg.seq_len, cfg.recover_steps, **kw)


def cid_for(number: int) -> str:
    """Candidate ids are trial numbers: unique across workers (the single-process graph uses episode numbers)."""
    return f"t{number:03d}"


def _records(study: optuna.Study) -> list[tuple[Any, Candidate]]:
    """(trial, candidate) for every finished trial holding its own record, in completion order.

    A record copied onto a retry (Optuna copies user attrs) names the old trial number and is ignored; a record on a
    trial that was failed by the heartbeat after writing it and then retried is ignored too (the retry counts). Only
    stale trials are retried, so a FAIL trial in a retry history was never told by its worker.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        r = t.user_attrs.get(T_RECORD)
        if not r or r.get("trial_number") != t.number or not t.state.is_finished():
            continue
        if t.state == TrialState.FAIL and t.number in retried:
            continue
        out.append((t, Candidate.model_validate(r)))
    out.sort(key=lambda tc: (tc[0].datetime_complete or tc[0].datetime_start, tc[0].number))
    return out


def frontier_from_study(study: optuna.Study, run_id: Optional[str] = None) -> FrontierFile:
    """The frontier file a single process would have written for the same recorded trials, from the study alone."""
    attrs = study.user_attrs
    if A_CONFIG not in attrs or A_RUN_META not in attrs:
        raise AcfError(f"study {study.study_name!r} was not made by `acf run --workers` (no acf config)")
    cfg = P.RunConfig.model_validate(attrs[A_CONFIG])
    meta = RunMeta.model_validate(attrs[A_RUN_META])
    meta.episodes = cfg.episodes
    if run_id:
        meta.run_id = run_id
    meta.stopped_because = attrs.get(A_STOPPED)
    ff = FrontierFile(run=meta, spec=attrs.get(A_SPEC, {}))
    if A_BASELINE in attrs:
        ff.baseline = Candidate.model_validate(attrs[A_BASELINE])
    ns = SimpleNamespace(ff=ff, cfg=cfg)
    recs = _records(study)
    for i, (t, c) in enumerate(recs, 1):
        c.episode = i
        c.artifact_kept = bool(c.artifact and Path(c.artifact).is_dir())
        ff.candidates.append(c)
        if ff.baseline is not None:
            P.score(cfg, ff.baseline.objectives, c)
            P._refresh(ns)  # type: ignore[arg-type]
    if recs:
        last = max((t.datetime_complete for t, _ in recs if t.datetime_complete), default=None)
        if last is not None and A_STARTED in attrs:
            meta.wall_seconds = round(max(0.0, last.timestamp() - float(attrs[A_STARTED])), 1)
    return ff


def rebuild_frontier(storage: str | BaseStorage, study_name: str, run_dir: str | Path,
                     prune_artifacts: bool = False) -> FrontierFile:
    """Rebuild run_dir/frontier.json from the study alone (any worker, the coordinator, or later `acf report`)."""
    st = make_storage(storage, heartbeat_interval=None) if isinstance(storage, str) else storage
    url = storage if isinstance(storage, str) else "storage"
    study = load_study(st, url, study_name)
    ff = frontier_from_study(study, Path(run_dir).name)
    if prune_artifacts and not study_config(study).keep_all:
        prune_artifact_dirs(ff)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_frontier_file(ff, Path(run_dir) / "frontier.json")
    return ff


def prune_artifact_dirs(ff: FrontierFile) -> None:
    """Delete models of candidates off the frontier. Safe from any process: a dominated candidate stays dominated."""
    for c in ff.candidates:
        if c.artifact and c.id not in ff.frontier and Path(c.artifact).is_dir():
            shutil.rmtree(c.artifact, ignore_errors=True)
            c.artifact_kept = False


# ---- worker ----------------------------------------------------------------------------------------------------

class WorkerContext(P.RunContext):
    """A RunContext whose run directory is the shared artifacts folder and whose frontier comes from the study.

    Artifacts live at <artifacts>/<study>/<cid>/model so each trial has a private parent folder (`compress` cleans
    partial siblings of its output, which must never be another worker's work in progress)."""

    def __init__(self, cfg: P.RunConfig, study: optuna.Study, console=None):
        super().__init__(cfg, console)
        self._study = study
        self.ff = None

    def artifact_dir(self, cid: str) -> Path:
        return self.dir / cid / "model"

    def episode_dir(self, episode: int) -> Path:
        return self.dir / cid_for(episode)

    def save(self) -> None:  # frontier.json is the coordinator's; workers keep theirs in memory
        pass


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

        from .models import resolve_device

        self.url, self.name = storage_url, study_name
        self.console = console or Console(stderr=False)
        self.storage = make_storage(storage_url, heartbeat_interval, grace_period, connect_timeout)
        self.study = load_study(self.storage, storage_url, study_name)
        cfg = study_config(self.study)
        art_root = check_artifacts_dir(artifacts or Path("runs") / "artifacts")
        cfg.run_dir = str(art_root / study_name)
        cfg.storage, cfg.study_name = storage_url, study_name
        cfg.device = resolve_device(device or cfg.device)
        # Control rows (baseline + recovery) live in the coordinator's frontier.json, which workers do not write;
        # the study has no place for them yet (the "study as the single store" part of issue 17).
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
        from .models import resolve_model
        from .spec import infer_spec

        cfg = self.ctx.cfg
        self.model_path = str(resolve_model(cfg.model))
        self.ctx._spec = infer_spec(self.model_path, cfg.trust_remote_code)
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
            P.evaluate_baseline(ctx, self.model_path)
        assert ctx.ff.baseline is not None
        rec = json.loads(ctx.ff.baseline.model_dump_json())
        self._db(lambda: study.set_user_attr(A_BASELINE, rec), "storing the baseline")
        return ctx.ff.baseline

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
        ff.run.wall_seconds = time.time() - float(attrs.get(A_STARTED, time.time()))
        self.ctx.t_start = time.time()
        # Episodes in flight elsewhere are not done: while they run this worker waits (`claim` returns None), in
        # case one of them dies and its trial is retried.
        return P.stop_reason(self.ctx)

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
        return trial, prop

    def _strategy_for(self, trial: optuna.Trial) -> Optional[dict]:
        """The trial's strategy (sampled, enqueued or edited), or None when it was closed as a duplicate."""
        ctx, study = self.ctx, self.study
        strategy, proposed_by = trial_proposal(ctx, trial)
        try:
            strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
        except StrategyError as e:
            cand = Candidate(id=cid_for(trial.number), episode=0, trial_number=trial.number, strategy=strategy,
                             description=strategy.describe(), status="rejected", reason=str(e)[:500],
                             proposed_by=proposed_by, started_at=now(), finished_at=now())
            self.record(trial, cand)
            return None
        key = strategy.key()
        prev = P.evaluated_twin(ctx, strategy)
        if prev is not None:
            # Same as an evaluated strategy: the sampler learns the earlier result, no compute is spent.
            trial.set_user_attr(T_DUPLICATE, prev.id)
            P._tell_like(ctx, trial, prev)
            return None
        for t in self._in_flight():
            if t.number != trial.number and t.user_attrs.get("acf_strategy_key") == key:
                release(study, trial.number, f"duplicate of trial {t.number}, which is running")
                return None
        trial.set_user_attr("acf_strategy_key", key)
        return {"strategy": strategy.model_dump(), "proposed_by": proposed_by}

    def run_trial(self, trial: optuna.Trial, prop: dict) -> Optional[Candidate]:
        """The episode engine's stages (acf.episode.run_episode, as the coordinator graph runs them), recorded
        into the trial (idempotent)."""
        from .atomic import write_json, write_text
        from .episode import Episode, run_episode

        ctx = self.ctx
        cid = cid_for(trial.number)
        strategy = Strategy(**prop["strategy"])
        ctx.say(f"\n[bold cyan]── trial {trial.number}[/] ({self.id}) · proposed by {prop['proposed_by']}: "
                f"{strategy.describe()}")
        ed = ctx.episode_dir(trial.number)

        def sink(cand: Candidate, predictions: Optional[list]) -> bool:
            write_json(ed / "strategy.json", strategy.model_dump())
            if predictions:
                write_json(ed / "predictions.json", predictions)
            recorded = self._db(lambda: self.record(trial, cand), f"recording trial {trial.number}")
            if recorded:
                write_text(ed / "result.json", cand.model_dump_json(indent=2))
                self.done += 1
                ctx.say(f"  {cid}: {cand.status}" + (f" · {cand.reason}" if cand.reason else ""))
            return recorded

        # episode 0: workers' candidates are numbered when the frontier is rebuilt from the study
        cand, recorded = run_episode(Episode(ctx, cid, trial.number, strategy, str(self.model_path)), sink,
                                     episode=0, trial_number=trial.number, proposed_by=prop["proposed_by"],
                                     t_propose=prop.get("t_propose", 0.0), started_at=now())
        return cand if recorded else None

    def record(self, trial: optuna.Trial, cand: Candidate) -> bool:
        """Write the candidate into the trial and tell, only while the trial is still RUNNING.

        Returns False when the trial was finished behind our back (failed by the heartbeat during a long outage and
        retried elsewhere): the result is then discarded, so nothing is recorded twice."""
        study, ctx = self.study, self.ctx
        ft = study._storage.get_trial(trial._trial_id)
        state = ft.state
        mine = (ft.user_attrs.get(T_RECORD) or {}).get("finished_at") == cand.finished_at
        told = {"ok": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(cand.status, TrialState.FAIL)
        if state != TrialState.RUNNING and mine and state == told and not self._was_retried(trial.number):
            return True  # our tell went through before the connection dropped; the retry of `record` is a no-op
        if state != TrialState.RUNNING:
            ctx.say(f"  [yellow]trial {trial.number} was already {state.name}[/] (failed by the heartbeat?); "
                    f"its result is discarded, the retry counts")
            if cand.artifact:
                shutil.rmtree(cand.artifact, ignore_errors=True)
            return False
        ff = ctx.ff
        if ff is not None and ff.baseline is not None:
            P.score(ctx.cfg, ff.baseline.objectives, cand)
        if cand.reason:
            cand.reason = cand.reason[:500]
        try:
            trial.set_user_attr(T_RECORD, json.loads(cand.model_dump_json()))
            trial.set_user_attr("candidate", cand.id)
            if cand.status == "ok" and len(cand.objectives) == len(ctx.cfg.objectives):
                P._set_constraint(ctx, trial, cand)
                study.tell(trial, [cand.objectives[o] for o in ctx.cfg.objectives])
            elif cand.status == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            ctx.say(f"  [yellow]trial {trial.number} was finished elsewhere while recording[/]; result discarded")
            return False
        if not ctx.cfg.keep_all:
            try:
                prune_artifact_dirs(self.refresh())
            except Exception as e:  # noqa: BLE001 — tidying is best effort; the record is safe
                log.warning("pruning artifacts: %s", _first_line(e))
        return True

    def _was_retried(self, number: int) -> bool:
        return any(number in t.system_attrs.get("retry_history", []) for t in self.study.get_trials(deepcopy=False))


def _sampler(cfg: P.RunConfig, salt: int) -> optuna.samplers.BaseSampler:
    from .search import make_sampler

    return make_sampler(cfg.sampler, (cfg.seed * 1_000_003 + salt) % 2**31, len(cfg.objectives))


def _proposer(ctx: P.RunContext, system_attrs: dict) -> str:
    """Like `pipeline._proposer`, which cannot see system attrs through Optuna 5's Trial."""
    if system_attrs.get("fixed_params"):
        return "seed recipe" if ctx.cfg.sampler != "grid" else "preset grid"
    return f"optuna:{ctx.cfg.sampler}"


def release(study: optuna.Study, number: int, reason: str) -> None:
    """Close a trial that will not run (budget, duplicate, approval bookkeeping) without a candidate record."""
    t = study.get_trials(deepcopy=False)[number]
    if t.state == TrialState.RUNNING:
        tr = P.trial_for(study, number)
        tr.set_user_attr(T_RELEASED, reason[:300])
        try:
            study.tell(tr, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


# ---- approval queue (coordinator side) -------------------------------------------------------------------------

def trial_proposal(ctx: P.RunContext, trial: optuna.Trial) -> tuple[Strategy, str]:
    """A trial's strategy (an edited one, or the space's for its params: sampled or enqueued; not yet validated)
    and who proposed it."""
    ua = trial.user_attrs
    sa = ctx.study._storage.get_trial(trial._trial_id).system_attrs
    proposed_by = (ua.get(T_PROPOSAL) or {}).get("proposed_by") or _proposer(ctx, sa)
    if "retry_history" in sa:
        proposed_by += f" (retry of trial {sa['retry_history'][-1]})"
    strategy = Strategy(**ua[T_STRATEGY]) if ua.get(T_STRATEGY) else ctx.space.suggest(trial)
    return strategy, proposed_by


def make_pending(ctx: P.RunContext, trial: optuna.Trial) -> None:
    """Turn a RUNNING trial into a proposal waiting for approval (no heartbeat: it is never failed as stale)."""
    strategy, proposed_by = trial_proposal(ctx, trial)
    try:
        strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
    except StrategyError as e:
        release(ctx.study, trial.number, f"invalid proposal: {e}")
        return
    from .episode import approval_request

    trial.set_user_attr(T_PROPOSAL, approval_request(ctx, strategy, proposed_by))
    trial.set_user_attr(T_APPROVAL, "pending")


class ApprovalQueue:
    """Proposals that wait for the user while several workers run (the coordinator's approval view).

    `top_up(n)` keeps n proposals pending; `pending()` lists them like the graph's approval request;
    `answer(number, answer)` takes the graph's answers: approve | skip | stop | {'action': 'edit', 'strategy': ...}.
    """

    def __init__(self, ctx: P.RunContext):
        self.ctx = ctx

    @property
    def study(self) -> optuna.Study:
        return self.ctx.study

    def _pending_trials(self) -> list:
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get(T_APPROVAL) == "pending"]

    def pending(self) -> list[dict]:
        out = []
        for t in self._pending_trials():
            p = dict(t.user_attrs[T_PROPOSAL])
            p.update(trial=t.number, choices=["approve", "edit", "skip", "stop"])
            out.append(p)
        return out

    def top_up(self, n: int, budget_left: Optional[int] = None) -> int:
        """Ask the sampler for proposals until n are pending (or the budget has no room). Returns how many pend."""
        study = self.study
        have = len(self._pending_trials())
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
        return len(self._pending_trials())

    def answer(self, number: int, answer: Any) -> str:
        """Apply the user's answer to pending trial `number`; returns the decision taken."""
        from .episode import decide

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
            tr = P.trial_for(study, number)
            tr.set_user_attr(T_RECORD, json.loads(cand.model_dump_json()))
            study.tell(tr, state=TrialState.FAIL)
            return "skip"
        if action == "stop":
            study.set_user_attr(A_STOP, "stopped by the user")
            for p in self._pending_trials():
                release(study, p.number, "stopped by the user at approval")
            return "stop"
        raise AssertionError(f"unhandled approval action {action!r}")


# ---- coordinator -----------------------------------------------------------------------------------------------

class Coordinator:
    """Owns frontier.json for a shared study: holds the study's coordinator lock, creates/joins the study, starts
    local workers, serves approvals, and rebuilds frontier.json from the study periodically and at the end."""

    def __init__(self, cfg: P.RunConfig, storage_url: Optional[str] = None, console=None,
                 lock_timeout: float = 60.0, heartbeat_interval: int = DEFAULT_HEARTBEAT,
                 grace_period: int = DEFAULT_GRACE, connect_timeout: int = DEFAULT_CONNECT_TIMEOUT):
        from rich.console import Console

        from .models import resolve_device
        from .tasks import get_task

        self.console = console or Console(stderr=False)
        P.validate_config(cfg, get_task(cfg.dataset, cfg.data_dir).metrics)
        cfg.device = resolve_device(cfg.device)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
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
        self.ctx: Optional[P.RunContext] = None
        self.queue: Optional[ApprovalQueue] = None

    # -- lock ----------------------------------------------------------------------------------------------------
    def _lock_study(self) -> optuna.Study:
        """A study handle for the lock before the study's config exists (creates an empty study if needed)."""
        _quiet_optuna()
        return optuna.create_study(storage=self.storage, study_name=self.cfg.study(), load_if_exists=True,
                                   directions=[P.DIRECTIONS[o] for o in self.cfg.objectives])

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
            log.warning("releasing the coordinator lock: %s", _first_line(e))

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
        from .atomic import write_text

        write_text(Path(self.cfg.run_dir) / "run_config.json", self.cfg.model_dump_json(indent=2))
        from .spec import save_spec

        save_spec(spec, Path(self.cfg.run_dir) / "model_spec.json")
        ctx = P.RunContext(self.cfg, self.console)
        ctx._study = study
        ctx._spec = spec
        self.ctx = ctx
        self.queue = ApprovalQueue(ctx)
        return study

    def rebuild(self) -> FrontierFile:
        assert self.study is not None
        ff = frontier_from_study(self.study, Path(self.cfg.run_dir).name)
        if not self.cfg.keep_all:
            prune_artifact_dirs(ff)
        save_frontier_file(ff, Path(self.cfg.run_dir) / "frontier.json")
        if self.ctx is not None:
            self.ctx.ff = ff
        return ff

    def start_workers(self, k: int, artifacts: Path, extra: Optional[list[str]] = None) -> None:
        """K local worker processes: one per visible GPU (CUDA_VISIBLE_DEVICES each), or K on CPU."""
        dev = self.cfg.device
        gpus: list[str] = []
        if dev.startswith("cuda"):
            vis = os.environ.get("CUDA_VISIBLE_DEVICES")
            if vis:
                gpus = [g for g in vis.split(",") if g.strip()]
            else:
                import torch

                gpus = [str(i) for i in range(torch.cuda.device_count())]
        logs = Path(self.cfg.run_dir) / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        src = str(Path(__file__).resolve().parents[1])
        for i in range(k):
            env = {**os.environ, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
            # Each worker gets its share of the CPU cores, GPU workers too: their host-side work (calibration
            # data, compressed-tensors packing, saving, tokenising) otherwise runs K x all-cores thread pools on
            # one host. Measured on 2 H200s without this: 2 workers ran each episode 1.2x slower than 1 worker.
            threads = max(1, (os.cpu_count() or 1) // k)
            env.setdefault("OMP_NUM_THREADS", str(threads))
            env.setdefault("MKL_NUM_THREADS", str(threads))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
                wdev = "cuda:0"
            else:
                wdev = "cpu"
            cmd = [sys.executable, "-m", "acf.cli", "worker", "--storage", self.url, "--study", self.cfg.study(),
                   "--device", wdev, "--artifacts", str(artifacts), "--heartbeat-interval", str(self.hb),
                   "--grace-period", str(self.grace)] + (extra or [])
            f = open(logs / f"worker-{i}.log", "ab")
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
            f.close()
        if k:
            self.console.print(f"started {k} worker(s) on {dev}" + (f" (GPUs {', '.join(gpus)})" if gpus else "")
                               + f"; logs in {logs}")

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
            for p in self.queue._pending_trials():
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
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_coordinator(cfg: P.RunConfig, workers: int, artifacts: Optional[Path] = None, console=None,
                    ask: Optional[Callable[[dict], Any]] = None, resume: bool = False,
                    refresh_seconds: float = 5.0) -> FrontierFile:
    """`acf run --workers K`: the coordinator plus K local workers sharing one study (K=0: workers elsewhere)."""
    from .runner import ask_terminal

    run_dir = Path(cfg.run_dir)
    if not resume and (run_dir / "run_config.json").exists():
        from .errors import RunDirError

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


# ---- CLI -------------------------------------------------------------------------------------------------------

def worker_cmd(
    storage: str = typer.Option(..., help="study storage: postgresql://user@host:port/db, sqlite:///f.db, "
                                                  "or a journal file (journal:///path/study.log)"),
    study: str = typer.Option(..., help="study name (made by `acf run --storage URL --study NAME --workers K`)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: the run's device)"),
    artifacts: Path = typer.Option(Path("runs/artifacts"), help="shared folder for compressed models"),
    max_episodes: Optional[int] = typer.Option(None, help="stop after this many episodes of this worker"),
    heartbeat_interval: int = typer.Option(DEFAULT_HEARTBEAT, help="seconds between trial heartbeats"),
    grace_period: int = typer.Option(DEFAULT_GRACE, help="a trial without heartbeat this long is failed "
                                                                 "and retried once"),
    connect_timeout: int = typer.Option(DEFAULT_CONNECT_TIMEOUT, help="database connect timeout (s)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Join a shared search and run its episodes (one Optuna trial each) until the shared budget is used."""
    from rich.console import Console

    from .logsetup import setup_logging

    setup_logging(verbose)
    w = Worker(storage, study, device=device, artifacts=artifacts, console=Console(), max_episodes=max_episodes,
               heartbeat_interval=heartbeat_interval, grace_period=grace_period, connect_timeout=connect_timeout)
    n = w.run()
    w.console.print(f"worker {w.id}: {n} episode(s) recorded")


def rebuild_cmd(
    storage: str = typer.Option(..., help="study storage URL"),
    study: str = typer.Option(..., help="study name"),
    run_dir: Path = typer.Option(..., help="where to write frontier.json (then `acf report RUN_DIR`)"),
):
    """Rebuild frontier.json from a shared study alone."""
    from rich.console import Console

    ff = rebuild_frontier(storage, study, run_dir)
    Console().print(f"wrote {Path(run_dir) / 'frontier.json'}: {len(ff.candidates)} candidates, frontier "
                    f"{', '.join(ff.frontier)}")
