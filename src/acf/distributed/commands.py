"""The Typer commands `acf worker` and `acf rebuild` (registered by acf.cli.main)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from acf.distributed.schema import DEFAULT_CONNECT_TIMEOUT, DEFAULT_GRACE, DEFAULT_HEARTBEAT
from acf.distributed.study import rebuild_frontier
from acf.distributed.worker import Worker


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

    from acf.core.logsetup import setup_logging

    setup_logging(verbose)
    w = Worker(storage, study, device=device, artifacts=artifacts, console=Console(), max_episodes=max_episodes,
               heartbeat_interval=heartbeat_interval, grace_period=grace_period, connect_timeout=connect_timeout)
    n = w.run()
    w.console.print(f"worker {w.id}: {n} episode(s) recorded")


def rebuild_cmd(
    storage: Optional[str] = typer.Option(None, help="study storage URL (default: the run directory's own study)"),
    study: Optional[str] = typer.Option(None, help="study name (default: the run directory's)"),
    run_dir: Path = typer.Option(..., help="where to write frontier.json (then `acf report RUN_DIR`)"),
):
    """Rebuild frontier.json from a run's study alone: a shared study (--storage, --study), or a single-process
    run's RUN_DIR/study.db."""
    from rich.console import Console

    if storage is None or study is None:
        from acf.coordinator.single_process import load_run_config

        cfg = load_run_config(run_dir)
        storage = storage or cfg.storage or f"sqlite:///{Path(run_dir).resolve() / 'study.db'}"
        study = study or cfg.study()
    ff = rebuild_frontier(storage, study, run_dir)
    Console().print(f"wrote {Path(run_dir) / 'frontier.json'}: {len(ff.candidates)} candidates, frontier "
                    f"{', '.join(ff.frontier)}")
