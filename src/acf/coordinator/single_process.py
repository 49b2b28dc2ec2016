"""The single-process driver (`acf run` without --workers; a shared study's is acf.distributed.coordinator): drive the
coordinator graph, start or resume a run, hand approvals to a terminal or to Python code.

`Pipeline(cfg).start()` returns either None (the run finished) or an approval request; `resume(answer)`
continues. The terminal front end (`run_in_terminal`) is that loop with a rich prompt.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Optional

from acf.core.atomic import write_text
from acf.core.errors import AcfError, RunDirError
from acf.models.loading import freeze_library_objects
from acf.coordinator.run_context import (RunConfig, RunContext, check_calibration, make_run_dir, task_for,
                                         validate_config)

THREAD = {"configurable": {"thread_id": "acf-run"}, "recursion_limit": 100000}


def load_run_config(run_dir: str | Path) -> RunConfig:
    p = Path(run_dir) / "run_config.json"
    if not Path(run_dir).is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    if not p.is_file():
        raise RunDirError(f"--resume {run_dir}: not an acf run directory (no run_config.json)")
    try:
        return RunConfig.model_validate_json(p.read_text())
    except Exception as e:  # pydantic ValidationError or JSON error: the file is not ours or is damaged
        raise RunDirError(f"{p}: corrupt run config ({type(e).__name__}); nothing was changed") from None


def check_study_db(run_dir: Path) -> None:
    """Refuse a corrupt study.db or checkpoints.db before anything writes to the run."""
    for name in ("study.db", "checkpoints.db"):
        p = run_dir / name
        if not p.exists():
            continue
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            ok = con.execute("PRAGMA quick_check").fetchone()[0]
            con.close()
        except sqlite3.DatabaseError as e:
            raise RunDirError(f"{p}: corrupt database ({e}); nothing was changed") from None
        if ok != "ok":
            raise RunDirError(f"{p}: corrupt database ({ok}); nothing was changed")


class Pipeline:
    def __init__(self, cfg: RunConfig, console=None, resume: bool = False):
        from langgraph.checkpoint.sqlite import SqliteSaver

        from acf.coordinator.graph import build_graph

        run_dir = Path(cfg.run_dir)
        if resume:
            check_study_db(run_dir)
        elif (run_dir / "run_config.json").exists():
            raise RunDirError(f"{run_dir} already holds a run: use --resume {run_dir} or another --run-dir")
        validate_config(cfg, task_for(cfg).metrics)   # a dataset file is read, checked and bound here
        from acf.models.loading import resolve_device, resolve_model

        cfg.device = resolve_device(cfg.device)
        if not resume:
            # an unknown or unreadable model (no config.json, weights cut short) is refused before the run
            # directory is written, so the same command works again once it is fixed (init_run resolves it again,
            # from the cache)
            # a calibration its data cannot fill is refused too (every calibrated episode would fail alike)
            check_calibration(cfg, resolve_model(cfg.model))
        # the study's name is fixed when the run starts, so a run folder that is moved or copied still finds it
        cfg.study_name = cfg.study()
        make_run_dir(run_dir)
        write_text(run_dir / "run_config.json", cfg.model_dump_json(indent=2))
        self.ctx = RunContext(cfg, console)
        if cfg.planner:
            from acf.planner import Planner

            self.ctx.planner = Planner.from_spec(cfg.planner, share=cfg.planner_share, max_calls=cfg.planner_max_calls,
                                                 timeout=cfg.planner_timeout, retries=cfg.planner_retries)
        self.conn = sqlite3.connect(str(run_dir / "checkpoints.db"), check_same_thread=False)
        self.graph = build_graph(self.ctx, SqliteSaver(self.conn))
        self._started = False
        if resume:
            self._on_resume()

    def _on_resume(self) -> None:
        """Results come back from the study (`run_store.open_run`); what the killed process left half-done is
        closed: trials it left running (but the one the graph will redo) fail, partial and unrecorded model
        folders go."""
        from acf.core.atomic import clean_partial_dirs
        from acf.coordinator.run_store import open_run
        from acf.search.space import fail_stale_trials

        open_run(self.ctx)

        snap = self.graph.get_state(THREAD)
        prop = (snap.values or {}).get("proposal") if snap else None
        keep = prop.get("trial") if prop else None
        failed = fail_stale_trials(self.ctx.study, keep)
        clean_partial_dirs(self.ctx.dir / "artifacts")
        # artifacts of episodes that never got recorded (died mid-compress) are redone, not reused
        recorded = {c.id for c in (self.ctx.ff.candidates if self.ctx.ff else [])}
        inflight = f"c{prop['episode']:03d}" if prop else None
        art = self.ctx.dir / "artifacts"
        if art.is_dir():
            import shutil

            for d in art.iterdir():
                # `.tmp-*` folders are clean_partial_dirs' to judge: one of a live process is not ours to remove
                if d.name not in recorded and d.name != inflight and not d.name.startswith(".tmp-"):
                    shutil.rmtree(d, ignore_errors=True)
        if failed:
            self.ctx.say(f"[dim]resume: trials {failed} left running by the killed process were marked failed[/]")

    def pending(self) -> Optional[dict]:
        snap = self.graph.get_state(THREAD)
        for task in snap.tasks or ():
            for intr in getattr(task, "interrupts", ()) or ():
                return intr.value
        return None

    def start(self) -> Optional[dict]:
        """Run until the next approval request (returned) or the end (None)."""
        freeze_library_objects()
        snap = self.graph.get_state(THREAD)
        if self.pending() is not None:
            return self.pending()
        inp: Any = None if snap.next else {}
        return self._invoke(inp)

    def resume(self, answer: Any) -> Optional[dict]:
        from langgraph.types import Command

        if self.pending() is None:
            raise AcfError("no approval is pending")
        return self._invoke(Command(resume=answer))

    def _invoke(self, inp: Any) -> Optional[dict]:
        out = self.graph.invoke(inp, THREAD, durability="sync")
        intr = out.get("__interrupt__") if isinstance(out, dict) else None
        if intr:
            return intr[0].value
        self._finish(out)
        return None

    def _finish(self, out: dict) -> None:
        from acf.coordinator.run_store import put_stopped, save_run

        ctx = self.ctx
        if ctx.ff is not None:
            put_stopped(ctx.study, (out or {}).get("stop"))
            save_run(ctx)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


def run_in_terminal(cfg: RunConfig, console, resume: bool = False,
                    ask: Optional[Callable[[dict], Any]] = None) -> RunContext:
    """Run (or resume) with approvals asked at the terminal; prints the frontier and where results are."""
    from acf.coordinator.records import frontier_table

    pipe = Pipeline(cfg, console, resume=resume)
    try:
        req = pipe.start()
        while req is not None:
            answer = (ask or (lambda r: ask_terminal(r, console)))(req)
            req = pipe.resume(answer)
    finally:
        pipe.close()
    ctx = pipe.ctx
    console.print()
    console.print(frontier_table(ctx))
    ff = ctx.ff
    if ff and ff.recommended:
        console.print(f"[bold]recommended[/]: {ff.recommended.id} — {ff.recommended.why}")
    if ff and ff.run.stopped_because:
        console.print(f"[dim]stopped: {ff.run.stopped_because}[/]")
    return ctx


def ask_terminal(req: dict, console) -> Any:
    from rich.panel import Panel
    from rich.prompt import Prompt

    lines = [f"[bold]episode {req['episode']}[/] · proposed by {req['proposed_by']}",
             f"strategy: [cyan]{req['describe']}[/]"]
    if req.get("rationale"):
        lines.append(f"rationale: {req['rationale']}")
    est = req.get("estimate") or {}
    lines.append(f"estimated compress time: ~{est.get('estimated_compress_seconds', '?')} s ({est.get('how', '')})")
    pred = req.get("prediction") or {}
    if pred.get("kld") is not None:
        lines.append(f"predicted (estimate, acf.search.surrogate): kld {pred['kld']:.4f}"
                     + (f" at {pred['size'] / 2**20:.1f} MiB" if pred.get("size") else ""))
    fr = req.get("frontier") or []
    lines.append(f"frontier so far ({len(fr)}): " + "; ".join(f"{f['id']} {f['strategy']}" for f in fr))
    if req.get("note"):
        lines.append(f"[red]{req['note']}[/]")
    console.print(Panel("\n".join(lines), title="approve this strategy?"))
    choice = Prompt.ask("approve / edit / skip / stop", choices=["approve", "edit", "skip", "stop", "a", "e", "s", "q"],
                        default="approve", console=console)
    choice = {"a": "approve", "e": "edit", "s": "skip", "q": "stop"}.get(choice, choice)
    if choice != "edit":
        return choice
    console.print("Current strategy JSON:\n" + json.dumps(req["strategy"]))
    text = Prompt.ask("new strategy JSON (one line)", console=console)
    # Validation (JSON syntax included) happens in the graph, which asks again with the problems listed.
    return {"action": "edit", "strategy": text}
