"""The coordinator graph: nodes and routing only. What each node does lives in `run_stages` (the run's set-up,
baseline and final evaluation), `episode` (an episode's proposal, approval and stages) and `trial` (a trial's
record and close), this package's.

spec -> baseline -> propose -> approve -> preflight -> compress -> proxy -> evaluate -> update -> propose | finalize

The episode's stages (preflight .. evaluate) are `episode`'s, routed by `episode.route`: the same engine a
distributed worker runs in one call (`episode.run_episode`); anything but ok skips to update, which records.

The state is small (ids, the proposal, the outcome); everything heavy is on disk. A SQLite checkpointer in the
run dir records the state after every node, so a killed run resumes at the node that was running.
"""

from __future__ import annotations

from typing import Optional, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from acf.coordinator import episode
from acf.coordinator.run_context import RunContext
from acf.coordinator.run_stages import ensure_baseline, final_evaluation, init_run, stop_reason
from acf.coordinator.trial import close
from acf.methods.strategy import Strategy


class EpisodeState(TypedDict, total=False):
    model_path: str
    proposal: Optional[dict]     # {episode, trial, strategy, proposed_by, rationale?, rejected?, t_propose}
    decision: Optional[str]      # approve | skip | stop | rejected | reask
    note: Optional[str]          # last approval error shown to the user
    outcome: Optional[dict]      # {status, reason, steps, metrics, proxy_metrics, timings, predictions}
    stop: Optional[str]


def build_graph(ctx: RunContext, checkpointer=None):
    def spec_node(state: EpisodeState) -> dict:
        return init_run(ctx)

    def baseline_node(state: EpisodeState) -> dict:
        ensure_baseline(ctx, state["model_path"])
        return {}

    def propose_node(state: EpisodeState) -> dict:
        reason = stop_reason(ctx.cfg, ctx.ff, ctx.run_seconds())
        if reason:
            return {"stop": reason, "proposal": None}
        prop = episode.next_proposal(ctx)
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
            "episode": prop["episode"], **episode.approval_request(ctx, strategy, prop["proposed_by"]),
            "rationale": prop.get("rationale"), "frontier": _frontier_summary(ctx), "note": state.get("note"),
            "choices": list(episode.CHOICES),
        })
        action, edited, note = episode.decide(ctx, answer)
        if action == "reask":
            return {"decision": "reask", "note": note}
        if action == "edit":
            prop.update(strategy=edited.model_dump(), proposed_by="user edit of " + prop["proposed_by"],
                        edited_from_trial=prop.get("trial"))
            return {"decision": "approve", "proposal": prop, "note": None}
        return {"decision": action}

    def stage_node(stage: str):
        def node(state: EpisodeState) -> dict:
            out = episode.start() if stage == "preflight" else dict(state.get("outcome") or episode.start())
            return {"outcome": episode.STAGES[stage](_episode(ctx, state), out)}

        node.__name__ = f"{stage}_node"
        return node

    def update_node(state: EpisodeState) -> dict:
        episode.record_in_run(_episode(ctx, state), state["proposal"], dict(state.get("outcome") or {}),
                        state.get("decision"))
        return {"proposal": None, "outcome": None, "decision": None}

    def stop_node(state: EpisodeState) -> dict:
        prop = state.get("proposal")
        if prop and prop.get("trial") is not None:
            _close(ctx, prop["trial"], "stopped by the user at approval")
        return {"stop": "stopped by the user", "proposal": None}

    def finalize_node(state: EpisodeState) -> dict:
        final_evaluation(ctx)
        return {}

    g = StateGraph(EpisodeState)
    for name, fn in [("spec", spec_node), ("baseline", baseline_node), ("propose", propose_node),
                     ("approve", approve_node), *((st, stage_node(st)) for st in episode.STAGES),
                     ("update", update_node),
                     ("user_stop", stop_node), ("finalize", finalize_node)]:
        g.add_node(name, fn)
    g.add_edge(START, "spec")
    g.add_edge("spec", "baseline")
    g.add_edge("baseline", "propose")
    g.add_conditional_edges("propose", lambda s: "finalize" if s.get("stop") else "approve", ["approve", "finalize"])
    g.add_conditional_edges("approve", _after_approve, ["preflight", "update", "approve", "user_stop"])
    # the episode's stages, routed as episode.route routes a worker's: anything but ok goes to update (record)
    for st in episode.STAGES:
        nexts = sorted({episode.route(st, {"status": "ok"}), "record"})
        g.add_conditional_edges(st, lambda s, st=st: _node(episode.route(st, s["outcome"])), [_node(n) for n in nexts])
    g.add_edge("update", "propose")
    g.add_edge("user_stop", END)
    g.add_edge("finalize", END)
    return g.compile(checkpointer=checkpointer)


def _node(stage: str) -> str:
    """The graph node of an episode stage: recording is the update node."""
    return "update" if stage == "record" else stage


def _episode(ctx: RunContext, state: EpisodeState) -> episode.Episode:
    prop = state["proposal"]
    return episode.Episode(ctx=ctx, cid=_cid(prop), number=prop["episode"], strategy=Strategy(**prop["strategy"]),
                     model_path=state["model_path"])


def _close(ctx: RunContext, number: int, reason: str) -> None:
    # not inlined in its node: LangGraph reads the attributes a node's closure names (ctx.study) when the graph is
    # built, and reading this one opens the study, before a resume has checked the run directory
    close(ctx.study, number, reason)


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


def _frontier_summary(ctx: RunContext) -> list[dict]:
    ff = ctx.ff
    out = []
    for cid in ff.frontier:
        c = ff.candidate(cid)
        out.append({"id": cid, "strategy": c.description, "objectives": c.objectives, "retention": c.retention})
    return out
