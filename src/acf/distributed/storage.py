"""Opening a study storage (RDB or journal file, both with heartbeats), retrying calls while the database is down,
joining an existing study, and the heartbeat threads."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import optuna
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

from acf.coordinator.run_context import RunConfig
from acf.core.errors import AcfError
from acf.coordinator.run_store import A_CONFIG
from acf.distributed.schema import DEFAULT_CONNECT_TIMEOUT, DEFAULT_DB_WAIT, DEFAULT_GRACE, DEFAULT_HEARTBEAT, HB_ATTR

log = logging.getLogger(__name__)


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed to be used with Study.optimize.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


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
    quiet_optuna()
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
        raise AcfError(f"cannot reach the study database at {where(url)} ({first_line(e)}); "
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


def first_line(e: BaseException) -> str:
    s = str(getattr(e, "orig", None) or e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def is_db_error(e: BaseException) -> bool:
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
            if not is_db_error(e) or isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
                raise
            if time.time() - t0 > wait:
                raise AcfError(f"the study database at {where(url)} stayed unreachable for {wait:.0f} s while "
                               f"{what} ({first_line(e)}); stopping") from None
            msg = f"database unreachable at {where(url)} while {what} ({first_line(e)}); retrying"
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
        if is_db_error(e):
            raise AcfError(f"cannot read studies at {where(url)} ({first_line(e)})") from None
        raise
    if study_name not in names:
        raise AcfError(f"no study {study_name!r} at {where(url)} (it has: {', '.join(names) or 'none'}); create it with "
                       f"`acf run --storage URL --study {study_name} --workers 0 ...`")
    study = optuna.load_study(study_name=study_name, storage=storage)
    if A_CONFIG not in study.user_attrs:
        raise AcfError(f"study {study_name!r} at {where(url)} was not made by `acf run --workers` (no acf config); "
                       f"refusing to join")
    return study


def study_config(study: optuna.Study) -> RunConfig:
    return RunConfig.model_validate(study.user_attrs[A_CONFIG])


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
                log.warning("heartbeat %s: %s", self.what, first_line(e))
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
