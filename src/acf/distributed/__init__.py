"""Several workers share one search through Optuna's storage (issue 9). No scheduler: the storage is the queue.

Each episode is one Optuna trial: a worker asks (or takes an approved proposal), builds the strategy, runs
preflight → compress → proxy/full evaluation with the episode engine the coordinator graph runs too
(`acf.coordinator.episode.run_episode`), then writes the whole candidate record into the trial's user attributes and
tells the study. Everything a frontier needs therefore lives in the study, stored as every run stores it
(`acf.coordinator.run_store`: config, spec summary and baseline as study attributes; one record per trial), so any
process can rebuild frontier.json from the storage alone (`rebuild_frontier`).

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

The package, by concern (each module imports only those above it):
  schema       the attribute names only shared runs use (claims, approvals, heartbeats) and heartbeat defaults
  storage      make_storage (RDB or journal file, with heartbeats), retry_db, load_study, Beat / trial heartbeats
  study        create_or_join, rebuild_frontier (frontier_from_study is acf.coordinator.run_store's)
  approval     release, make_pending, ApprovalQueue (approval with several workers)
  worker       Worker: claim a trial, run acf.coordinator.episode.run_episode, record into the trial
A trial's proposal, record and close are acf.coordinator.trial's (propose, record, close), the functions the
single-process graph uses too; `trial_proposal` and `release` here are that module's.
  processes    spawn_workers / stop_processes (local `acf worker` processes)
  coordinator  Coordinator, run_coordinator (`acf run --workers K`)
  commands     the Typer commands `acf worker` and `acf rebuild`
Every public name stays importable from `acf.distributed`.
"""

from __future__ import annotations

from acf.distributed.approval import ApprovalQueue, make_pending, release, trial_proposal
from acf.distributed.commands import rebuild_cmd, worker_cmd
from acf.distributed.coordinator import Coordinator, run_coordinator
from acf.distributed.processes import spawn_workers, stop_processes
from acf.coordinator.run_store import (A_BASELINE, A_CONFIG, A_RUN_META, A_SPEC, A_STARTED, A_STOPPED, T_RECORD,
                                       frontier_from_study, prune_artifact_dirs)
from acf.distributed.schema import (A_APPROVAL, A_BASELINE_CLAIM, A_COORDINATOR, A_STOP, DEFAULT_CONNECT_TIMEOUT,
                                    DEFAULT_DB_WAIT, DEFAULT_GRACE, DEFAULT_HEARTBEAT, HB_ATTR, T_APPROVAL,
                                    T_DUPLICATE, T_PROPOSAL, T_RELEASED, T_STRATEGY, T_WORKER)
from acf.distributed.storage import (Beat, HeartbeatJournalStorage, fail_stale, first_line, is_db_error,
                                     journal_path, load_study, make_storage, quiet_optuna, retry_db, study_config,
                                     trial_heartbeat, where)
from acf.distributed.study import cid_for, create_or_join, rebuild_frontier
from acf.distributed.worker import Worker, WorkerContext, check_artifacts_dir, worker_id

__all__ = [
    "ApprovalQueue", "make_pending", "release", "trial_proposal", "rebuild_cmd", "worker_cmd", "Coordinator",
    "run_coordinator", "spawn_workers", "stop_processes", "A_APPROVAL", "A_BASELINE", "A_BASELINE_CLAIM", "A_CONFIG",
    "A_COORDINATOR", "A_RUN_META", "A_SPEC", "A_STARTED", "A_STOP", "A_STOPPED", "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DB_WAIT", "DEFAULT_GRACE", "DEFAULT_HEARTBEAT", "HB_ATTR", "T_APPROVAL", "T_DUPLICATE", "T_PROPOSAL",
    "T_RECORD", "T_RELEASED", "T_STRATEGY", "T_WORKER", "Beat", "HeartbeatJournalStorage", "fail_stale", "first_line",
    "is_db_error", "journal_path", "load_study", "make_storage", "quiet_optuna", "retry_db", "study_config",
    "trial_heartbeat", "where", "cid_for", "create_or_join", "frontier_from_study", "prune_artifact_dirs",
    "rebuild_frontier", "Worker", "WorkerContext", "check_artifacts_dir", "worker_id",
]
