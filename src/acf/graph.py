"""The coordinator graph: nodes and routing only. What each node does lives in `acf.pipeline` and `acf.episode`.

spec -> baseline -> propose -> approve -> preflight -> compress -> proxy -> evaluate -> update -> propose | finalize -> END

The episode's stages (preflight .. evaluate) are `acf.episode`'s, routed by `acf.episode.route`: the same engine a
distributed worker runs in one call (`acf.episode.run_episode`); anything but ok skips to update, which records.

The state is small (ids, the proposal, the outcome); everything heavy is on disk. A SQLite checkpointer in the
run dir records the state after every node, so a killed run resumes at the node that was running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from . import episode as E
from . import pipeline as P
from .errors import StrategyError
from .strategy import Strategy, validate_strategy

#: when this process started: an episode proposed before it was interrupted (kill, Ctrl-C) and redone on resume
_PROCESS_START = time.time()


class EpisodeState(TypedDict, total=False):
    model_path: str
    proposal: Optional[dict]     # {episode, trial, strategy, proposed_by, rationale?, rejected?, t_propose}
    decision: Optional[str]      # approve | skip | stop | rejected | reask
    note: Optional[str]          # last approval error shown to the user
    outcome: Optional[dict]      # {status, reason, steps, metrics, proxy_metrics, timings, predictions}
    stop: Optional[str]


def build_graph(ctx: P.RunContext, checkpointer=None):
    def spec_node(state: EpisodeState) -> dict:
        return P.init_run(ctx)

    def baseline_node(state: EpisodeState) -> dict:
        P.evaluate_baseline(ctx, state["model_path"])
        return {}

    def propose_node(state: EpisodeState) -> dict:
        reason = P.stop_reason(ctx)
        if reason:
            return {"stop": reason, "proposal": None}
        prop = P.propose(ctx)
        ctx.say(f"\n[bold cyan]── episode {prop['episode']}/{ctx.cfg.episodes}[/] · frontier "
                f"{len(ctx.ff.frontier)} · hypervolume {ctx.ff.hypervolume[-1].hypervolume if ctx.ff.hypervolume else 0:.4f}")
        ctx.say(f"  proposed by {prop['proposed_by']}: {Strategy(**prop['strategy']).describe()}")
        return {"proposal": prop, "outcome": None, "decision": None, "note": None, "stop": None}

    def approve_node(state: EpisodeState) -> dict:
        prop = dict(state["proposal"])
        if prop.get("rejected"):
            return {"decision": "rejected"}
        if not ctx.cfg.interactive:
            return {"decision": "approve"}
        strategy = Strategy(**prop["strategy"])
        answer = interrupt({
            "episode": prop["episode"], "strategy": strategy.model_dump(), "describe": strategy.describe(),
            "proposed_by": prop["proposed_by"], "rationale": prop.get("rationale"),
            "estimate": P.estimate_cost(ctx, strategy), "frontier": _frontier_summary(ctx), "note": state.get("note"),
            "choices": ["approve", "edit", "skip", "stop"],
        })
        action, edited = _parse_answer(answer)
        if action == "edit":
            try:
                new = validate_strategy(edited, ctx.spec, ctx.cfg.device)
            except StrategyError as e:
                return {"decision": "reask", "note": str(e)}
            prop.update(strategy=new.model_dump(), proposed_by="user edit of " + prop["proposed_by"],
                        edited_from_trial=prop.get("trial"))
            return {"decision": "approve", "proposal": prop, "note": None}
        if action not in ("approve", "skip", "stop"):
            return {"decision": "reask", "note": f"unknown choice {action!r}: approve, edit, skip or stop"}
        return {"decision": action}

    def stage_node(stage: str):
        def node(state: EpisodeState) -> dict:
            out = state.get("outcome") if stage != "preflight" else E.start()
            return {"outcome": E.STAGES[stage](_episode(ctx, state), dict(out or E.start()))}

        node.__name__ = f"{stage}_node"
        return node

    def update_node(state: EpisodeState) -> dict:
        prop, out = state["proposal"], dict(state.get("outcome") or {})
        decision = state.get("decision")
        if decision == "rejected":
            out = {"status": "rejected", "reason": prop["rejected"]}
        elif decision == "skip":
            out = {"status": "skipped", "reason": "skipped by the user at approval"}
        trial = prop.get("trial")
        if prop.get("edited_from_trial") is not None:
            P.release_trial(ctx, prop["edited_from_trial"], "replaced by a user edit")
            trial = None
        t0 = time.time()
        cand, _ = E.record(_episode(ctx, state), out, lambda c, preds: _record(ctx, c, trial, preds),
                           episode=prop["episode"], trial_number=prop.get("trial"), proposed_by=prop["proposed_by"],
                           rationale=prop.get("rationale"), t_propose=prop.get("t_propose", 0.0),
                           started_at=prop.get("t0"))
        cid = cand.id
        c = ctx.ff.candidate(cid)
        c.timings["update"] = round(time.time() - t0, 3)
        if prop.get("t0_epoch") and not ctx.cfg.interactive:
            # wall time of the whole episode, graph and checkpoint writes included (approval waits excluded).
            # An episode redone after a resume counts from this process's start; the lost attempt is kept apart.
            start = max(prop["t0_epoch"], _PROCESS_START)
            c.timings["episode_wall"] = round(time.time() - start, 3)
            if prop["t0_epoch"] < _PROCESS_START:
                c.timings["interrupted_before_resume"] = round(_PROCESS_START - prop["t0_epoch"], 3)
        ctx.save()
        status = {"ok": "[green]ok[/]", "failed": "[red]failed[/]", "pruned": "[yellow]pruned[/]"}.get(c.status,
                                                                                                    c.status)
        on = " · [bold green]on the frontier[/]" if cid in ctx.ff.frontier else ""
        ctx.say(f"  {cid}: {status}{on}" + (f" · retention {c.retention:.3f}" if c.retention is not None else "")
                + (f" · {c.reason}" if c.reason and c.status != "ok" else ""))
        return {"proposal": None, "outcome": None, "decision": None}

    def stop_node(state: EpisodeState) -> dict:
        prop = state.get("proposal")
        if prop and prop.get("trial") is not None:
            P.release_trial(ctx, prop["trial"], "stopped by the user at approval")
        return {"stop": "stopped by the user", "proposal": None}

    def finalize_node(state: EpisodeState) -> dict:
        P.final_evaluation(ctx)
        return {}

    g = StateGraph(EpisodeState)
    for name, fn in [("spec", spec_node), ("baseline", baseline_node), ("propose", propose_node),
                     ("approve", approve_node), *((st, stage_node(st)) for st in E.STAGES), ("update", update_node),
                     ("user_stop", stop_node), ("finalize", finalize_node)]:
        g.add_node(name, fn)
    g.add_edge(START, "spec")
    g.add_edge("spec", "baseline")
    g.add_edge("baseline", "propose")
    g.add_conditional_edges("propose", lambda s: "finalize" if s.get("stop") else "approve", ["approve", "finalize"])
    g.add_conditional_edges("approve", _after_approve, ["preflight", "update", "approve", "user_stop"])
    # the episode's stages, routed as acf.episode.route routes a worker's: anything but ok goes to update (record)
    for st in E.STAGES:
        nexts = sorted({E.route(st, {"status": "ok"}), "record"})
        g.add_conditional_edges(st, lambda s, st=st: _node(E.route(st, s["outcome"])), [_node(n) for n in nexts])
    g.add_edge("update", "propose")
    g.add_edge("user_stop", END)
    g.add_edge("finalize", END)
    return g.compile(checkpointer=checkpointer)


def _node(stage: str) -> str:
    """The graph node of an episode stage: recording is the update node."""
    return "update" if stage == "record" else stage


def _episode(ctx: P.RunContext, state: EpisodeState) -> E.Episode:
    prop = state["proposal"]
    return E.Episode(ctx=ctx, cid=_cid(prop), number=prop["episode"], strategy=Strategy(**prop["strategy"]),
                     model_path=state["model_path"])


def _record(ctx: P.RunContext, cand, trial, predictions) -> bool:
    P.record(ctx, cand, trial, predictions)
    return True


def _after_approve(s: EpisodeState) -> str:
    d = s.get("decision")
    if d == "approve":
        return "preflight"
    if d in ("skip", "rejected"):
        return "update"
    if d == "stop":
        return "user_stop"
    return "approve"


def _cid(prop: dict) -> str:
    return f"c{prop['episode']:03d}"


def _parse_answer(answer: Any) -> tuple[str, Any]:
    """Approval answers: 'approve' | 'skip' | 'stop' | {'action': 'edit', 'strategy': {...}} (or a JSON string)."""
    if isinstance(answer, str):
        a = answer.strip()
        if a.startswith("{"):
            import json

            try:
                answer = json.loads(a)
            except ValueError:
                return "reask", None
        else:
            return a.lower(), None
    if isinstance(answer, dict):
        return str(answer.get("action", "")).lower(), answer.get("strategy")
    return "reask", None


def _frontier_summary(ctx: P.RunContext) -> list[dict]:
    ff = ctx.ff
    out = []
    for cid in ff.frontier:
        c = ff.candidate(cid)
        out.append({"id": cid, "strategy": c.description, "objectives": c.objectives, "retention": c.retention})
    return out
