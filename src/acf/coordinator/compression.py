"""Running a strategy's steps for the run: into the candidate's artifact folder (or a given one, e.g. the recipe
cache), with the run's step context (device, task, teacher, seed, calibration mix). One place, so an episode, a
control row and a fixed recipe are compressed alike."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from acf.core.atomic import clean_partial_dirs
from acf.core.errors import MethodFailed
from acf.coordinator.run_context import RunContext
from acf.methods.strategy import Strategy


def compress(ctx: RunContext, cid: str, strategy: Strategy, model_path: str, episode: int,
             log_dir: Optional[Path] = None, out: Optional[Path] = None) -> tuple[list, Optional[str]]:
    """Run the strategy's steps into `out` (default artifacts/<cid>). Returns (step records, failure reason or
    None)."""
    from acf.methods import StepContext
    from acf.methods.run_steps import run_strategy

    out = out or ctx.artifact_dir(cid)
    clean_partial_dirs(out.parent)
    if out.exists():
        shutil.rmtree(out)  # an earlier attempt of this episode died half-way: redo it
    # calibration and training text: the task's train split, or the run's --calib-data file
    sctx = StepContext(device=ctx.cfg.device, task=ctx.calib_task, teacher_dir=Path(model_path), seed=ctx.cfg.seed,
                       trust_remote_code=ctx.cfg.trust_remote_code, calib_mix=ctx.cfg.calib_mix)
    try:
        records = run_strategy(strategy, Path(model_path), out, sctx,
                               log_dir=log_dir or ctx.episode_dir(episode) / "logs")
    except MethodFailed as e:
        return getattr(e, "records", []), str(e)
    failed = [r for r in records if r.status != "ok"]
    if failed:
        return records, failed[0].reason or "a step failed"
    return records, None
