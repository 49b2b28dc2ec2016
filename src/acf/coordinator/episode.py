"""One episode engine: a proposal -> approval -> preflight -> compress -> proxy evaluation -> full evaluation ->
record, each stage's work written here, next to the stage.

The episode used to be written twice, as the coordinator graph's nodes and again in the distributed worker, so
every change to an episode had to be made in both. Both now run these stages and this `route` between them:

* the coordinator graph (acf.coordinator.graph) makes each stage a node and `route` its edges, so a killed run
  resumes at the stage that was running (the LangGraph checkpoint holds the outcome between stages);
* a distributed worker (acf.distributed) calls `run_episode`, the same stages and the same `route` in one call.

A trial's proposal, record and close are acf.coordinator.trial's, shared the same way. Approval is shared too:
what the user is shown (`approval_request`) and how an answer is decided (`decide`). What differs by nature stays
with the callers: where proposals come from and how an answer is waited for (`next_proposal`: the planner or Optuna
and a LangGraph interrupt in one process; the study used as a queue across workers), and where a finished
candidate goes: `finish` hands it to the caller's sink (`record_in_run` is the single-process one). The run's own
stages (set-up, baseline, final evaluation) are acf.coordinator.run_stages'.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna

from acf.core.errors import AcfError, StrategyError
from acf.core.objectives import DIRECTIONS, QUALITY
from acf.core.provenance import Measurement
from acf.coordinator import compression
from acf.coordinator.preflight import estimate_cost, preflight as preflight_refusal
from acf.coordinator.records import metrics_line, objective_values, ok_candidates
from acf.coordinator.run_context import RUNTIME_METRICS, RunContext
from acf.coordinator.run_eval import evaluate_in_run, metrics_to_measure
from acf.coordinator.run_store import put_control, save_run
from acf.coordinator.screening import MAX_SCREENS, aim_of, enqueue_aim, surrogate, waiting_aim
from acf.coordinator.state import Candidate, episodes_recorded, now
from acf.coordinator.trial import close, propose, record
from acf.methods.strategy import Strategy, kind_of, validate_strategy
from acf.search.pareto import dominates
from acf.search.reward import retention

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

    ctx: RunContext
    cid: str            # c001 (one process, by episode) or t001 (workers, by trial number)
    number: int         # names the episode's folders (RunContext.episode_dir)
    strategy: Strategy
    model_path: str


# ---- approval ----------------------------------------------------------------------------------------------------

CHOICES = ("approve", "edit", "skip", "stop")


def approval_request(ctx: RunContext, strategy: Strategy, proposed_by: str, **extra: Any) -> dict:
    """What the user sees before an episode runs, in the graph's interrupt and in the workers' approval queue."""
    try:
        pred = surrogate(ctx).predict(strategy).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - advisory: the request is shown without it
        pred = {"how": f"no prediction: {type(e).__name__}: {e}"}
    return {"strategy": strategy.model_dump(), "describe": strategy.describe(), "proposed_by": proposed_by,
            "estimate": estimate_cost(ctx, strategy), "prediction": pred, **extra}


def decide(ctx: RunContext, answer: Any) -> tuple[str, Optional[Strategy], Optional[str]]:
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


# ---- the single process's proposals ---------------------------------------------------------------------------

def next_proposal(ctx: RunContext) -> dict:
    """The next episode's proposal in a single process: the planner's, on its turns; else Optuna's, asked until a
    trial is to be run (`trial.propose` tells repeats of evaluated strategies and screened-out proposals at once)
    or validation refuses it (its trial told FAIL; the episode is recorded as rejected)."""
    assert ctx.ff is not None
    episode = episodes_recorded(ctx.ff) + 1
    t0 = time.time()
    started = {"t0_epoch": t0, "t0": now()}
    if ctx.planner is not None and ctx.planner.wants_turn(episode, ctx):
        prop = ctx.planner.propose(ctx)
        if prop is not None:
            return {**prop, **started, "episode": episode, "t_propose": round(time.time() - t0, 3)}
    study = ctx.study
    screens = 0
    for attempt in range(50 + MAX_SCREENS):
        # aimed on its first attempts; a space where the aim keeps repeating evaluated strategies samples freely
        if attempt < 3 and not waiting_aim(study):
            enqueue_aim(ctx, episode)
        trial = study.ask()
        p = propose(ctx, trial, screens_so_far=screens)
        aim = aim_of(study, trial.number)
        if p.rejected is not None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return {**started, "episode": episode, "trial": trial.number, "strategy": p.strategy.model_dump(),
                    "proposed_by": p.proposed_by, "rejected": p.rejected, "t_propose": round(time.time() - t0, 3)}
        if p.closed == "screened":
            screens += 1
        if not p.runs:
            continue
        assert p.prediction is not None
        return {**started, "episode": episode, "trial": trial.number, "strategy": p.strategy.model_dump(),
                "proposed_by": p.proposed_by, "prediction": p.prediction.model_dump(mode="json"), "aim": aim,
                "t_propose": round(time.time() - t0, 3)}
    raise AcfError(f"the search space is exhausted: {50 + MAX_SCREENS} proposals in a row repeated evaluated "
                   f"strategies or were screened out")


# ---- the stages ----------------------------------------------------------------------------------------------------

def start() -> Outcome:
    return {"status": "ok", "timings": {}}


def preflight(ep: Episode, out: Outcome) -> Outcome:
    """Refuse an episode that will not fit (disk, memory) before anything runs."""
    reason = preflight_refusal(ep.ctx, ep.strategy)
    if reason:
        ep.ctx.say(f"  [yellow]preflight refused[/]: {reason}")
        return {**out, "status": "rejected", "reason": "preflight: " + reason}
    return out


def compress(ep: Episode, out: Outcome) -> Outcome:
    t0 = time.time()
    records, err = compression.compress(ep.ctx, ep.cid, ep.strategy, ep.model_path, ep.number)
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
        metrics, prune = proxy_decision(ep.ctx, ep.cid)
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


def proxy_decision(ctx: RunContext, cid: str) -> tuple[dict[str, Measurement], Optional[str]]:
    """Cheap evaluation on --proxy-limit items; returns (proxy metrics, prune reason or None)."""
    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None and ff.baseline is not None
    q = [m for m in cfg.objectives if m in QUALITY]
    if not cfg.proxy_limit or not q or not ff.baseline.proxy_metrics:
        return {}, None
    art = ctx.artifact_dir(cid)
    res = evaluate_in_run(ctx, art, q + ["size"], cfg.proxy_limit, loaded=ctx.loaded(cid, art))
    base = {o: ff.baseline.proxy_metrics[o].value for o in q if o in ff.baseline.proxy_metrics}
    vals = {o: res.metrics[o].value for o in q}
    ret = retention(vals, base, cfg.objectives)
    if ret is not None and cfg.min_retention is not None and ret < cfg.min_retention - 0.1:
        return res.metrics, (f"proxy retention {ret:.3f} on {cfg.proxy_limit} items is far below the "
                             f"--min-retention {cfg.min_retention} (margin 0.1)")
    pk = vals.get("kld")
    if pk is not None and cfg.max_kld is not None and pk > 2 * cfg.max_kld:
        return res.metrics, (f"proxy kld {pk:.3f} on {cfg.proxy_limit} items is more than twice the --max-kld "
                             f"{cfg.max_kld}")
    # Optimistic full-evaluation estimate: quality 5% better than the proxy, costs not yet measured as ideal.
    est: dict[str, float] = {}
    for o in cfg.objectives:
        if o in q:
            v = vals[o]
            est[o] = v * 0.95 if DIRECTIONS[o] == "minimize" else v * 1.05 + 0.02
        elif o == "size":
            est[o] = res.metrics["size"].value
        else:
            est[o] = 0.0 if DIRECTIONS[o] == "minimize" else math.inf
    # Proxy quality of frontier members is compared on the same proxy items.
    for c in ok_candidates(ff):
        if c.id not in ff.frontier or not c.proxy_metrics:
            continue
        other = dict(c.objectives)
        for o in q:
            if o in c.proxy_metrics and c.proxy_metrics[o].value is not None:
                other[o] = c.proxy_metrics[o].value
        if all(o in other for o in cfg.objectives) and dominates(other, est, cfg.objectives):
            return res.metrics, f"dominated by {c.id} even with an optimistic estimate from the proxy evaluation"
    return res.metrics, None


def evaluate(ep: Episode, out: Outcome) -> Outcome:
    """The full evaluation on the search items, then the control row of a strategy with recovery steps."""
    ctx = ep.ctx
    t0 = time.time()
    try:
        art = ctx.artifact_dir(ep.cid)
        res = evaluate_in_run(ctx, art, metrics_to_measure(ctx), ctx.cfg.limit, loaded=ctx.loaded(ep.cid, art),
                              known_sparsity=sparsity_from_steps(ep.strategy, out.get("steps", [])))
    except (KeyboardInterrupt, AcfError):
        raise
    except Exception as e:  # noqa: BLE001 - one candidate's evaluation failing must not end the run
        return _failed(ep, out, e)
    finally:
        ctx.release()
    timings = {**out.get("timings", {}), "evaluate": round(time.time() - t0, 2)}
    out = {**out, "metrics": _dump(res.metrics), "predictions": res.predictions, "timings": timings}
    ctx.say(metrics_line(ep.cid, res.metrics, ctx.cfg.objectives))
    if ctx.cfg.controls:
        t1 = time.time()
        out["control"] = ensure_control(ctx, ep.strategy)
        if out["control"]:
            out["timings"] = {**out["timings"], "control": round(time.time() - t1, 2)}
    return out


def ensure_control(ctx: RunContext, strategy: Strategy) -> Optional[str]:
    """The control row for a strategy with recovery steps: the uncompressed model given the same recovery
    (LoRA/distillation steps and their params) and no compression, measured once per distinct recovery and
    reused. Its quality change is task adaptation; the candidate's change beyond it is compression.
    Returns the control's id (None when the strategy has no recovery step)."""
    ff = ctx.ff
    assert ff is not None
    rec = [st for st in strategy.steps if kind_of(st.method) in ("lora", "distill") and not st.params.get("qlora")]
    if not rec:
        return None
    cs = Strategy(steps=rec)
    for c in ff.controls:
        if c.strategy.key() == cs.key():
            return c.id
    cid = f"ctrl{len(ff.controls) + 1:02d}"
    ctx.say(f"  [bold]control[/] {cid}: baseline + {cs.describe()} (no compression), to measure task adaptation "
            f"apart")
    t0 = time.time()
    records, err = compression.compress(ctx, cid, cs, ff.run.model_path, 0, log_dir=ctx.dir / "controls" / cid / "logs")
    cand = Candidate(id=cid, episode=0, strategy=cs, description=cs.describe() + " (control: no compression)",
                     proposed_by="control", steps=records, started_at=now())
    art = ctx.artifact_dir(cid)
    if err:
        cand.status, cand.reason = "failed", err
    else:
        try:
            res = evaluate_in_run(ctx, art, [m for m in metrics_to_measure(ctx) if m not in RUNTIME_METRICS],
                                  ctx.cfg.limit)
            cand.metrics = res.metrics
            cand.objectives = objective_values(ctx.cfg.objectives, res.metrics)
            cand.retention = retention(cand.objectives, ff.baseline.objectives, ctx.cfg.objectives)
        except (KeyboardInterrupt, AcfError):
            raise
        except Exception as e:  # noqa: BLE001 - a failed control leaves the candidate without its split
            cand.status, cand.reason = "failed", f"evaluation: {type(e).__name__}: {str(e)[:300]}"
    cand.timings = {"control": round(time.time() - t0, 2)}
    cand.finished_at = now()
    cand.artifact = str(art) if art.exists() and cand.status == "ok" else None
    cand.artifact_kept = cand.artifact is not None
    if cand.status != "ok" or not (ctx.cfg.keep_all or ctx.cfg.final_limit):
        shutil.rmtree(art, ignore_errors=True)
        cand.artifact, cand.artifact_kept = None, False
    put_control(ctx.study, cand)
    save_run(ctx)
    ctx.say(metrics_line(cid, cand.metrics, ctx.cfg.objectives) if cand.status == "ok"
            else f"  [red]control {cid} failed[/]: {cand.reason}")
    return cid


def sparsity_from_steps(strategy: Strategy, steps: list) -> Optional[Measurement]:
    """For a quantized result: the sparsity its pruning steps measured before quantization (0 without one)."""
    if not any(kind_of(s.method) == "quantize" for s in strategy.steps):
        return None
    measured = None
    for r in steps:
        extra = r.get("extra", {}) if isinstance(r, dict) else r.extra
        method = r.get("method") if isinstance(r, dict) else r.method
        if "measured_sparsity" in extra:
            measured = (float(extra["measured_sparsity"]), method)
    if measured is None:
        return Measurement(value=0.0, unit="fraction", device="", method="no pruning step: no sparsity (the exact "
                                                                         "zeros of a quantized grid are not sparsity)")
    return Measurement(value=measured[0], unit="fraction", device="",
                       method=f"share of exact zeros in Linear weights measured after the {measured[1]} step, before "
                              f"quantization (a dequantized grid's zeros are not counted)")


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


def finish(ep: Episode, out: Outcome, sink: Sink, **meta: Any) -> tuple[Candidate, bool]:
    """Build the candidate and hand it to the caller's sink; returns it and whether it was recorded."""
    cand = candidate(ep, out, **meta)
    return cand, sink(cand, out.get("predictions"))


def run_episode(ep: Episode, sink: Sink, **meta: Any) -> tuple[Candidate, bool]:
    """Every stage of an approved proposal, routed by `route`, then `finish` (what the graph's nodes do one by
    one). `meta` are the candidate's facts from the proposal (see `candidate`)."""
    out, stage = start(), "preflight"
    while stage != "record":
        out = STAGES[stage](ep, out)
        stage = route(stage, out)
    return finish(ep, out, sink, **meta)


def record_in_run(ep: Episode, prop: dict, out: Outcome, decision: Optional[str]) -> Candidate:
    """The single-process run's recording (the graph's update node): the candidate, with the episode's wall time,
    into the run's study (`trial.record`, which tells Optuna), the episode folder, then frontier.json derived from
    the study; a proposal rejected by validation or skipped at approval is recorded as such."""
    ctx = ep.ctx
    if decision == "rejected":
        out = {"status": "rejected", "reason": prop["rejected"]}
    elif decision == "skip":
        out = {"status": "skipped", "reason": "skipped by the user at approval"}
    trial = prop.get("trial")
    if prop.get("edited_from_trial") is not None:
        close(ctx.study, prop["edited_from_trial"], "replaced by a user edit")
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
        stored = record(ctx.study, ctx.cfg, cand, trial) == "recorded"
        write_episode_files(ctx.episode_dir(cand.episode), cand, predictions)
        save_run(ctx)
        return stored

    cand, _ = finish(ep, out, sink, episode=prop["episode"], trial_number=prop.get("trial"),
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
