"""Run a validated strategy: each step reads the previous step's output and writes its own, atomically.

Every step is measured (wall time, device, peak memory, output size), logs to its own file, and fails typed
(oom, no_cuda, shape, library, ...). Nothing half-written ever appears under a final name: steps write into
`atomic_dir` temporaries, intermediates live under `<out_dir>.work/` and are removed at the end, and on failure
nothing is left at `out_dir`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from acf.core.atomic import atomic_dir, clean_partial_dirs
from acf.core.errors import MethodFailed
from acf.core.instruments import PeakRSS, dir_size
from acf.methods.base import StepContext, StepRecord, get_impl
from acf.methods.step_progress import StepProgress, num_blocks
from acf.models.loading import freeze_library_objects


def classify(method: str, exc: BaseException) -> MethodFailed:
    """Map an exception from a method or library to a typed MethodFailed (kind + one-line reason)."""
    if isinstance(exc, MethodFailed):
        return exc
    msg = f"{type(exc).__name__}: {exc}".strip()
    low = msg.lower()
    first = msg.splitlines()[0][:500] if msg else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in low or isinstance(exc, MemoryError):
        return MethodFailed(method, "oom", first)
    if ("cuda" in low and ("not available" in low or "not compiled" in low or "no cuda gpus" in low
                           or "found no nvidia driver" in low)):
        return MethodFailed(method, "no_cuda", first)
    if isinstance(exc, FileNotFoundError):
        return MethodFailed(method, "input", first)
    shape_words = ("shape", "size mismatch", "mat1 and mat2", "must be divisible", "not divisible",
                   "columns % group", "dimension", "expanded size")
    if any(w in low for w in shape_words):
        return MethodFailed(method, "shape", first)
    return MethodFailed(method, "library", first)


class _StepStream:
    """Stands in for stdout/stderr during a step. Libraries that create log handlers lazily keep a reference to
    whatever sys.stderr was at the time; after the step this object forwards to the original stream instead of
    a closed file, so those handlers keep working."""

    def __init__(self, fh, original, progress=None):
        self.fh, self.original, self.progress = fh, original, progress

    def write(self, s: str) -> int:
        if self.progress is not None and self.fh is not None:
            self.progress.feed(s)
        target = self.fh if self.fh is not None else self.original
        return target.write(s)

    def flush(self) -> None:
        (self.fh if self.fh is not None else self.original).flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    def detach_file(self) -> None:
        self.fh = None


class _KeepThreshold(logging.Filter):
    """Passes a record of one of `levels`' loggers (or their children) only at or above that logger's level."""

    def __init__(self, levels: dict[str, int]):
        super().__init__()
        self.levels = levels

    def filter(self, record: logging.LogRecord) -> bool:
        for name, level in self.levels.items():
            if record.name == name or record.name.startswith(name + "."):
                return record.levelno >= level
        return True


def _handlers_reached(loggers: list[logging.Logger]) -> list[logging.Handler]:
    """Every handler a record of these loggers reaches: their own and their ancestors' along `propagate`."""
    out: dict[int, logging.Handler] = {}
    for lg in loggers:
        cur: Optional[logging.Logger] = lg
        while cur is not None:
            for h in cur.handlers:
                out[id(h)] = h
            cur = cur.parent if cur.propagate else None
    return list(out.values())


@contextlib.contextmanager
def _step_log(path: Path, ctx_log: logging.Logger, progress=None) -> Iterator[None]:
    """Send this step's logging (acf, transformers, llm-compressor's loguru) and Python-level stdout/stderr to
    its own file, so a failure can be read after the fact without interleaving with other steps; `progress`
    (acf.methods.step_progress.StepProgress) reads that output for the block in progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a", encoding="utf-8", buffering=1)
    out_s, err_s = _StepStream(fh, sys.stdout, progress), _StepStream(fh, sys.stderr, progress)
    handler = logging.StreamHandler(out_s)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    libs = ("transformers", "peft", "llmcompressor", "compressed_tensors", "autoround")
    loggers = [logging.getLogger(n) for n in ("acf", *libs)]
    if not (ctx_log.name == "acf" or ctx_log.name.startswith("acf.")):   # acf.* already reaches the acf handler
        loggers.append(ctx_log)
    old_levels = []
    # The file gets INFO from the libraries, but every handler that was already there (transformers' own stderr
    # handler, or the root handler it propagates to when CI is set) keeps the threshold the user chose for them:
    # lowering the logger alone dumped every model config onto the terminal. acf's own INFO lines (training
    # progress every 10 steps) reach the terminal as before.
    keep = _KeepThreshold({n: logging.getLogger(n).getEffectiveLevel() for n in libs})
    filtered = _handlers_reached(loggers)
    for h in filtered:
        h.addFilter(keep)
    for lg in dict.fromkeys(loggers):
        lg.addHandler(handler)
        old_levels.append((lg, lg.level))
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    sink_id = None
    try:
        from loguru import logger as _loguru

        sink_id = _loguru.add(out_s, level="INFO")
    except Exception:  # loguru only comes with llm-compressor
        pass
    try:
        with contextlib.redirect_stdout(out_s), contextlib.redirect_stderr(err_s):
            yield
    finally:
        if sink_id is not None:
            from loguru import logger as _loguru

            with contextlib.suppress(ValueError):
                _loguru.remove(sink_id)
        for lg, lvl in old_levels:
            lg.removeHandler(handler)
            lg.setLevel(lvl)
        for h in filtered:
            h.removeFilter(keep)
        out_s.detach_file()
        err_s.detach_file()
        fh.close()


def _device_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def run_step(method: str, params: dict, in_dir: Path, out_dir: Path, ctx: StepContext, log_path: Path) -> StepRecord:
    """Run one method from `in_dir` into `out_dir` (atomic). Never raises for method failures: the record says."""
    rec = StepRecord(method=method, params=params, device=_device_label(ctx.device), log_path=str(log_path))
    cuda = ctx.device.startswith("cuda")
    t0 = time.perf_counter()
    rss: Optional[PeakRSS] = None
    progress = StepProgress(method, num_blocks(Path(in_dir)), sys.stderr)
    try:
        with _step_log(log_path, ctx.log, progress), progress:
            print(f"== {method} {params}\n   in:  {in_dir}\n   out: {out_dir}", flush=True)
            try:
                if not (Path(in_dir) / "config.json").is_file():
                    raise MethodFailed(method, "input", f"input model directory {in_dir} is missing or has no "
                                                        f"config.json (deleted while the run was going?)")
                if cuda and not torch.cuda.is_available():
                    raise MethodFailed(method, "no_cuda", f"device {ctx.device} asked for, but CUDA is not available")
                fn = get_impl(method)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(torch.device(ctx.device))
                    base = torch.cuda.memory_allocated(torch.device(ctx.device))
                with PeakRSS() as rss:
                    with atomic_dir(out_dir) as tmp:
                        extra = fn(dict(params), Path(in_dir), tmp, ctx) or {}
                        gc.collect()
                        if not (tmp / "config.json").is_file():
                            raise MethodFailed(method, "library", "the method wrote no model (no config.json)")
                rec.extra = extra
                if cuda:
                    rec.peak_memory_bytes = int(torch.cuda.max_memory_allocated(torch.device(ctx.device)) - base)
                    rec.peak_memory_how = "torch.cuda.max_memory_allocated increase during the step"
                else:
                    rec.peak_memory_bytes = int(rss.added)
                    rec.peak_memory_how = "process RSS peak increase during the step (sampled every 5 ms)"
                rec.output_dir = str(out_dir)
                rec.output_size_bytes = dir_size(out_dir)
            except BaseException as e:  # noqa: BLE001 - typed below; interrupts and exits re-raised
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    # SIGTERM handlers exit with SystemExit: a killed process must stop, not record a failed step
                    raise
                mf = classify(method, e)
                traceback.print_exc()
                rec.status = "failed"
                rec.reason = f"{mf.kind}: {mf.reason}"
                rec.extra = {"failure_kind": mf.kind}
                if rss is not None and not cuda:
                    rec.peak_memory_bytes, rec.peak_memory_how = int(rss.added), "process RSS peak increase"
            rec.wall_seconds = round(time.perf_counter() - t0, 3)
            print(f"== {rec.status} in {rec.wall_seconds:.1f}s" + (f": {rec.reason}" if rec.reason else ""), flush=True)
    finally:
        gc.collect()
        if cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rec


def run_strategy(strategy: Any, model_dir: str | Path, out_dir: str | Path, ctx: StepContext,
                 log_dir: Optional[str | Path] = None) -> list[StepRecord]:
    """Run the (already validated) strategy's steps in order from `model_dir`; the final model lands in `out_dir`.

    Returns one StepRecord per step that ran; it stops at the first failed step (its record has status="failed"
    and a typed reason), and then nothing exists at `out_dir`. Intermediate outputs live in `<out_dir>.work/` and
    are removed at the end. Logs: `<log_dir or out_dir.logs>/step-NN-<method>.log`.
    An empty strategy (the baseline) copies the model into `out_dir` so callers always find the result there.
    """
    freeze_library_objects()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    steps = list(getattr(strategy, "steps", strategy))
    log_dir = Path(log_dir) if log_dir else out_dir.with_name(out_dir.name + ".logs")
    work = out_dir.with_name(out_dir.name + ".work")
    clean_partial_dirs(out_dir.parent)
    if work.exists():
        shutil.rmtree(work)
    if out_dir.exists():
        shutil.rmtree(out_dir)   # a previous run's output must not pass for this run's
    if log_dir.is_dir():
        for old in log_dir.glob("step-*.log"):
            old.unlink()         # logs describe this run only
    records: list[StepRecord] = []
    if not (model_dir / "config.json").is_file():
        rec = StepRecord(method=steps[0].method if steps else "baseline", params={}, status="failed",
                         reason=f"input: model directory {model_dir} is missing or has no config.json")
        return [rec]
    if not steps:
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        return records
    cur = model_dir
    try:
        for i, step in enumerate(steps, start=1):
            method = step.method
            params = dict(step.params)
            last = i == len(steps)
            dst = out_dir if last else work / f"step-{i:02d}-{method}"
            log_path = log_dir / f"step-{i:02d}-{method}.log"
            ctx.log.info("step %d/%d: %s", i, len(steps), method)
            rec = run_step(method, params, cur, dst, ctx, log_path)
            records.append(rec)
            if rec.status != "ok":
                ctx.log.warning("step %d (%s) failed: %s (log: %s)", i, method, rec.reason, log_path)
                break
            if cur != model_dir and cur.parent == work:
                shutil.rmtree(cur, ignore_errors=True)   # the previous intermediate is no longer needed
            cur = dst
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if records and records[-1].status != "ok" and out_dir.exists():
            shutil.rmtree(out_dir, ignore_errors=True)
    for r in records:     # intermediates are gone; keep their sizes but not dangling paths
        if r.output_dir and Path(r.output_dir) != out_dir:
            r.extra["intermediate_removed"] = True
            r.output_dir = None
    return records
