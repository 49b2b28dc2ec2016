"""One episode engine: an approved proposal -> preflight -> compress -> proxy evaluation -> full evaluation -> record.

The episode used to be written twice, as the coordinator graph's nodes and again in the distributed worker, so
every change to an episode had to be made in both. Both now run these stages and this `route` between them:

* the coordinator graph (acf.coordinator.graph) makes each stage a node and `route` its edges, so a killed run
  resumes at the stage that was running (the LangGraph checkpoint holds the outcome between stages);
* a distributed worker (acf.distributed) calls `run_episode`, the same stages and the same `route` in one call.

Approval is shared too: what the user is shown (`approval_request`) and how an answer is decided (`decide`). What
differs by nature stays with the callers: where proposals come from and how an answer is waited for (an Optuna ask
or the planner and a LangGraph interrupt in one process; the study used as a queue across workers), and where a
record goes (frontier.json and the run's study, or the trial's attributes): `record` takes that sink as an argument
(`record_in_run` is the single-process one).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from acf.coordinator import pipeline as P
from acf.coordinator import preflight as PF
from acf.coordinator import records as REC
from acf.coordinator import run_context as RC
from acf.core.errors import AcfError, StrategyError
from acf.coordinator.state import Candidate, now
from acf.methods.strategy import Strategy, validate_strategy

log = logging.getLogger(__name__)

#: when this process started: an episode proposed before it was interrupted (kill, Ctrl-C) and redone on resume
_PROCESS_START = time.time()

#: the outcome so far, JSON-ready (it is checkpointed between the graph's nodes):
#: {status, reason, steps, timings, proxy_metrics, metrics, predictions, control}
Outcome = dict[str, Any]
#: where a finished candidate goes; returns whether it was recorded (a worker's trial may be gone)
Sink = Callable[[Candidate, Optional[list]], bool]


@dataclass
class Episode:
    """What every stage needs: the run, the candidate's id and folders, its strategy and the input model."""

    ctx: RC.RunContext
    cid: str            # c001 (one process, by episode) or t001 (workers, by trial number)
    number: int         # names the episode's folders (RunContext.episode_dir)
    strategy: Strategy
    model_path: str


# ---- approval ----------------------------------------------------------------------------------------------------

CHOICES = ("approve", "edit", "skip", "stop")


def approval_request(ctx: RC.RunContext, strategy: Strategy, proposed_by: str, **extra: Any) -> dict:
    """What the user sees before an episode runs, in the graph's interrupt and in the workers' approval queue."""
    from acf.coordinator.screening import surrogate

    try:
        pred = surrogate(ctx).predict(strategy).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - advisory: the request is shown without it
        pred = {"how": f"no prediction: {type(e).__name__}: {e}"}
    return {"strategy": strategy.model_dump(), "describe": strategy.describe(), "proposed_by": proposed_by,
            "estimate": PF.estimate_cost(ctx, strategy), "prediction": pred, **extra}


def decide(ctx: RC.RunContext, answer: Any) -> tuple[str, Optional[Strategy], Optional[str]]:
    """An approval answer as (action, edited strategy, note): action is approve | edit | skip | stop, or reask with
    the note to show (an edit that does not validate, an unknown choice). Answers: 'approve' | 'skip' | 'stop' |
    {'action': 'edit', 'strategy': {...}} (or that as a JSON string)."""
    action, edited = _parse_answer(answer)
    if action == "edit":
        try:
            return "edit", validate_strategy(edited, ctx.spec, ctx.cfg.device), None
        except StrategyError as e:
            return "reask", None, str(e)
    if action not in CHOICES:
        return "reask", None, f"unknown choice {action!r}: approve, edit, skip or stop"
    return action, None, None


def _parse_answer(answer: Any) -> tuple[str, Any]:
    if isinstance(answer, str):
        a = answer.strip()
        if not a.startswith("{"):
            return a.lower(), None
        try:
            answer = json.loads(a)
        except ValueError:
            return "reask", None
    if isinstance(answer, dict):
        return str(answer.get("action", "")).lower(), answer.get("strategy")
    return "reask", None


# ---- the stages ----------------------------------------------------------------------------------------------------

def start() -> Outcome:
    return {"status": "ok", "timings": {}}


def preflight(ep: Episode, out: Outcome) -> Outcome:
    """Refuse an episode that will not fit (disk, memory) before anything runs."""
    reason = PF.preflight(ep.ctx, ep.strategy)
    if reason:
        ep.ctx.say(f"  [yellow]preflight refused[/]: {reason}")
        return {**out, "status": "rejected", "reason": "preflight: " + reason}
    return out


def compress(ep: Episode, out: Outcome) -> Outcome:
    t0 = time.time()
    records, err = P.compress(ep.ctx, ep.cid, ep.strategy, ep.model_path, ep.number)
    dt = round(time.time() - t0, 2)
    out = {**out, "steps": [r.model_dump() for r in records], "timings": {**out.get("timings", {}), "compress": dt}}
    if err:
        ep.ctx.say(f"  [red]compress failed[/] after {dt:.1f} s: {err}")
        return {**out, "status": "failed", "reason": err}
    ep.ctx.say(f"  compressed in {dt:.1f} s")
    return out


def proxy(ep: Episode, out: Outcome) -> Outcome:
    """Cheap evaluation on --proxy-limit items; a candidate it prunes is not evaluated in full. The loaded
    candidate stays in memory for the full evaluation."""
    t0 = time.time()
    try:
        metrics, prune = P.proxy_decision(ep.ctx, ep.cid)
    except (KeyboardInterrupt, AcfError):
        ep.ctx.release()
        raise
    except Exception as e:  # noqa: BLE001 - one candidate's evaluation failing must not end the run
        ep.ctx.release()
        return _failed(ep, out, e)
    out = {**out, "proxy_metrics": _dump(metrics),
           "timings": {**out.get("timings", {}), "proxy_evaluate": round(time.time() - t0, 2)}}
    if prune:
        ep.ctx.release()
        ep.ctx.say(f"  [yellow]pruned[/] after proxy evaluation: {prune}")
        return {**out, "status": "pruned", "reason": prune}
    return out


def evaluate(ep: Episode, out: Outcome) -> Outcome:
    """The full evaluation on the search items, then the control row of a strategy with recovery steps."""
    ctx = ep.ctx
    t0 = time.time()
    try:
        res = P.full_evaluation(ctx, ep.cid, known_sparsity=P.sparsity_from_steps(ep.strategy, out.get("steps", [])))
    except (KeyboardInterrupt, AcfError):
        raise
    except Exception as e:  # noqa: BLE001 - one candidate's evaluation failing must not end the run
        return _failed(ep, out, e)
    finally:
        ctx.release()
    timings = {**out.get("timings", {}), "evaluate": round(time.time() - t0, 2)}
    out = {**out, "metrics": _dump(res.metrics), "predictions": res.predictions, "timings": timings}
    ctx.say(REC.metrics_line(ep.cid, res.metrics, ctx.cfg.objectives))
    if ctx.cfg.controls:
        t1 = time.time()
        out["control"] = P.ensure_control(ctx, ep.strategy)
        if out["control"]:
            out["timings"] = {**out["timings"], "control": round(time.time() - t1, 2)}
    return out


def _failed(ep: Episode, out: Outcome, e: BaseException) -> Outcome:
    kind = "oom" if "out of memory" in str(e).lower() or isinstance(e, MemoryError) else "evaluation"
    log.exception("evaluation of %s failed", ep.cid)
    reason = f"{kind}: evaluation failed: {type(e).__name__}: {str(e)[:300]}"
    ep.ctx.say(f"  [red]evaluation failed[/]: {reason}")
    return {**out, "status": "failed", "reason": reason}


def _dump(metrics: dict) -> dict:
    return {k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in metrics.items()}


STAGES: dict[str, Callable[[Episode, Outcome], Outcome]] = {"preflight": preflight, "compress": compress,
                                                              "proxy": proxy, "evaluate": evaluate}


def route(stage: str, out: Outcome) -> str:
    """The stage after `stage` ('record' ends the episode). Anything but ok (refused by preflight, a failed
    compression or evaluation, a proxy that prunes) goes straight to recording."""
    if out.get("status", "ok") != "ok":
        return "record"
    return {"preflight": "compress", "compress": "proxy", "proxy": "evaluate", "evaluate": "record"}[stage]


def candidate(ep: Episode, out: Outcome, *, episode: int, trial_number: Optional[int], proposed_by: str,
              rationale: Optional[str] = None, t_propose: float = 0.0, started_at: Optional[str] = None,
              prediction: Optional[dict] = None, aim: Optional[dict] = None) -> Candidate:
    """The episode's record from its outcome; a model that is not a usable candidate is deleted."""
    art = ep.ctx.artifact_dir(ep.cid)
    ok = out.get("status") == "ok" and art.exists()
    if not ok and art.exists():
        shutil.rmtree(art, ignore_errors=True)
    return Candidate(
        id=ep.cid, episode=episode, trial_number=trial_number, strategy=ep.strategy,
        description=ep.strategy.describe(), status=out.get("status", "failed"), reason=out.get("reason"),
        proposed_by=proposed_by, rationale=rationale, metrics=out.get("metrics") or {},
        proxy_metrics=out.get("proxy_metrics") or {}, steps=out.get("steps", []), control=out.get("control"),
        artifact=str(art) if ok else None, artifact_kept=ok,
        timings={**out.get("timings", {}), "propose": t_propose}, started_at=started_at, finished_at=now(),
        prediction=prediction, aim=aim)


def record(ep: Episode, out: Outcome, sink: Sink, **meta: Any) -> tuple[Candidate, bool]:
    """Build the candidate and hand it to the caller's sink; returns it and whether it was recorded."""
    cand = candidate(ep, out, **meta)
    return cand, sink(cand, out.get("predictions"))


def run_episode(ep: Episode, sink: Sink, **meta: Any) -> tuple[Candidate, bool]:
    """Every stage of an approved proposal, routed by `route`, then `record` (what the graph's nodes do one by
    one). `meta` are the candidate's facts from the proposal (see `candidate`)."""
    out, stage = start(), "preflight"
    while stage != "record":
        out = STAGES[stage](ep, out)
        stage = route(stage, out)
    return record(ep, out, sink, **meta)


def record_in_run(ep: Episode, prop: dict, out: Outcome, decision: Optional[str]) -> Candidate:
    """The single-process run's recording (the graph's update node): the candidate, with the episode's wall time,
    into the run's study (`run_store.put_record`, which tells Optuna), the episode folder, then frontier.json
    derived from the study; a proposal rejected by validation or skipped at approval is recorded as such."""
    from acf.coordinator import run_store as RS

    ctx = ep.ctx
    if decision == "rejected":
        out = {"status": "rejected", "reason": prop["rejected"]}
    elif decision == "skip":
        out = {"status": "skipped", "reason": "skipped by the user at approval"}
    trial = prop.get("trial")
    if prop.get("edited_from_trial") is not None:
        REC.release_trial(ctx, prop["edited_from_trial"], "replaced by a user edit")
        trial = None

    def sink(cand: Candidate, predictions: Optional[list]) -> bool:
        if prop.get("t0_epoch") and not ctx.cfg.interactive:
            # wall time of the whole episode up to its record, graph and checkpoint writes included (approval waits
            # excluded). An episode redone after a resume counts from this process's start; the lost attempt is
            # kept apart.
            begun = max(prop["t0_epoch"], _PROCESS_START)
            cand.timings["episode_wall"] = round(time.time() - begun, 3)
            if prop["t0_epoch"] < _PROCESS_START:
                cand.timings["interrupted_before_resume"] = round(_PROCESS_START - prop["t0_epoch"], 3)
        stored = RS.put_record(ctx.study, ctx.cfg, cand, trial)
        write_episode_files(ctx.episode_dir(cand.episode), cand, predictions)
        RS.save_run(ctx)
        return stored

    cand, _ = record(ep, out, sink, episode=prop["episode"], trial_number=prop.get("trial"),
                     proposed_by=prop["proposed_by"], rationale=prop.get("rationale"),
                     t_propose=prop.get("t_propose", 0.0), started_at=prop.get("t0"),
                     prediction=prop.get("prediction"), aim=prop.get("aim"))
    assert ctx.ff is not None
    c = ctx.ff.candidate(cand.id)
    status = {"ok": "[green]ok[/]", "failed": "[red]failed[/]", "pruned": "[yellow]pruned[/]"}.get(c.status, c.status)
    on = " · [bold green]on the frontier[/]" if c.id in ctx.ff.frontier else ""
    ctx.say(f"  {c.id}: {status}{on}" + (f" · retention {c.retention:.3f}" if c.retention is not None else "")
            + (f" · {c.reason}" if c.reason and c.status != "ok" else ""))
    return c


def write_episode_files(folder: Path, cand: Candidate, predictions: Optional[list]) -> None:
    """EPISODE_DIR/{strategy,result,predictions}.json, atomically: what a user reads of one episode (copies of the
    study's record; neither driver reads them back)."""
    from acf.core.atomic import write_json, write_text

    write_json(folder / "strategy.json", cand.strategy.model_dump())
    write_text(folder / "result.json", cand.model_dump_json(indent=2))
    if predictions:
        write_json(folder / "predictions.json", predictions)
