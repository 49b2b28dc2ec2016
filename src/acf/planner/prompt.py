"""What the chat model sees: the system rules, the run described as a prompt, and the read-only tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from acf.core.errors import AcfError
from acf.methods.strategy import METHODS, Strategy, method_table


EXAMPLE_RATIONALE = "<why this strategy, given the history>"
# rationales copied from the prompt's format lines: a copied example is not a reasoned proposal
PLACEHOLDERS = {"why this strategy, given the history", "why, in 1-3 sentences", "why this strategy"}

SYSTEM = """You are the planner of acf, a tool that searches compressed versions of a language model.
Each episode you propose ONE compression strategy. It is validated, run, and measured; the results come back to you
in the history. Aim for strategies that extend the Pareto frontier of the objectives, or fill its gaps.

Rules:
- A strategy is an ordered list of steps {"method": ..., "params": {...}}; omitted params take their defaults.
- Order: prune -> (distill or lora) -> quantize. At most one quantization step.
- Omitted calibration settings take the run's values (calib_samples and seq_len below).
- Use only the allowed methods listed below; group_size must be one of the valid group sizes (or null for
  per-channel).
- Do not repeat a strategy that is already in the history.

Answer with ONE JSON object and nothing else, in this form:
{"strategy": {"steps": [{"method": "...", "params": {...}}]}, "rationale": "why, in 1-3 sentences",
 "objective": "which objective or trade-off it targets"}"""


def build_messages(ctx, max_history: int = 16, tools: bool = False) -> list:
    """System rules + one human message with the spec, the space, the history, the frontier and the reward."""
    from langchain_core.messages import HumanMessage, SystemMessage

    system = SYSTEM
    if tools:
        system += ("\n\nYou may call validate_strategy and estimate_cost (read-only) at most twice before answering; "
                   "they take the strategy as a JSON string.")
    return [SystemMessage(content=system), HumanMessage(content=build_prompt(ctx, max_history))]


def build_prompt(ctx, max_history: int = 16) -> str:
    cfg, spec, ff = ctx.cfg, ctx.spec, ctx.ff
    lines = ["## Model",
             f"{spec.family} {spec.architecture}: {spec.params / 1e6:.1f}M parameters, {spec.num_layers} layers, hidden "
             f"{spec.hidden_size}, intermediate {spec.intermediate_size}, dtype {spec.dtype}. "
             f"Valid quantization group sizes: {spec.valid_group_sizes} (others are invalid for this model). "
             f"Device: {cfg.device}. Run calibration: calib_samples {cfg.calib_samples}, seq_len {cfg.seq_len}.",
             "", "## Allowed methods (parameter: default)"]
    allowed = _allowed_methods(ctx)
    hints = _card_hints()
    for row in method_table():
        if row["method"] not in allowed:
            continue
        info = METHODS[row["method"]]
        if info.needs_cuda and not cfg.device.startswith("cuda"):
            continue
        run_vals = {"calib_samples": cfg.calib_samples, "seq_len": cfg.seq_len} if info.kind in ("quantize", "prune") \
            else {}
        ps = ", ".join(f"{k}: {json.dumps(run_vals.get(k, v.get('default')))}" + (f" {v['enum']}" if v.get("enum")
                                                                                  else "")
                       for k, v in row["params"].items())
        line = f"- {row['method']} ({row['kind']}): {row['description']}. {ps}"
        if row["method"] in hints:
            h = dict(hints[row["method"]])
            if "group_size" in h:   # the cards' generic sizes may not divide this model's widths
                h["group_size"] = list(spec.valid_group_sizes) + [None]
            line += f". Useful ranges: {json.dumps(h, separators=(',', ':'))}"
        lines.append(line)
    notes = hints.get("__notes__")
    if notes:
        lines += ["Notes: " + " ".join(notes)]
    lines += ["", "## Objectives and reward",
              "objectives: " + ", ".join(f"{o} ({ff.run.directions.get(o, '?')})" for o in cfg.objectives)
              + f"; reward preset {cfg.preset}; min retention {cfg.min_retention}."]
    if ff.baseline is not None:
        lines.append("baseline: " + _objs(ff.baseline.objectives))
    lines += ["", f"## History (last {max_history} of {len(ff.candidates)} episodes)"]
    if not ff.candidates:
        lines.append("none yet")
    for c in ff.candidates[-max_history:]:
        s = f"- {c.id} [{c.status}] {json.dumps(_compact(c.strategy), separators=(',', ':'))}"
        if c.objectives:
            s += " -> " + _objs(c.objectives)
        if c.retention is not None:
            s += f", retention {c.retention:.3f}"
        if c.reason and c.status != "ok":
            s += f" ({c.reason[:120]})"
        lines.append(s)
    lines += ["", "## Current frontier: " + (", ".join(ff.frontier) or "empty")]
    if ff.recommended:
        lines.append(f"recommended under {ff.recommended.preset}: {ff.recommended.id}")
    from acf.search.aim import gaps, target

    g = gaps(ff)
    if g:
        # the aim (acf.search.aim): where acf trails the best fixed recipe most
        lines += ["", "## Against the best fixed recipe at each size (kld ratio: acf's best at no larger size / the "
                      "recipe's; lower is better)"] + [f"- {x.describe()}" for x in g]
        t = target(ff)
        if t is not None:
            lines.append(f"Aim: the largest gap is at {t.size / 2**20:.1f} MiB ({t.recipe_id}): propose a strategy "
                         f"no larger than that with less kld")
    lines += ["", "Example of the answer format only (replace the <placeholders>; choose your own strategy):", json.dumps(_example(ctx)), "",
              "Propose the next strategy now: one JSON object."]
    return "\n".join(lines)


def _allowed_methods(ctx) -> set[str]:
    out = set()
    for name, info in METHODS.items():
        if info.kind == "quantize" and ctx.cfg.quant_methods and name not in ctx.cfg.quant_methods:
            continue
        if info.kind == "prune" and ctx.cfg.prune_methods and name not in ctx.cfg.prune_methods:
            continue
        out.add(name)
    return out


def _card_hints() -> dict[str, Any]:
    """Per-method ranges and notes from the subagent cards (agents/*.md); missing cards only lose hints."""
    try:
        from acf.coordinator.subagents import load_cards

        cards = load_cards()
    except AcfError:
        return {}
    out: dict[str, Any] = {}
    notes = []
    for c in cards.values():
        for m, r in (c.search_space.get("methods") or {}).items():
            out[m] = r
        if c.search_space.get("notes") and c.search_space.get("methods"):
            notes.append(str(c.search_space["notes"]))
    if notes:
        out["__notes__"] = notes
    return out


def _example(ctx) -> dict:
    space = ctx.space
    g = [int(x) for x in space.group_sizes if x != "channel"]
    q = next((m for m in ("gptq", "rtn", "awq") if m in space.quant_methods), None)
    if q:
        params = {"bits": 4, "group_size": g[-1] if g else None}
        step = {"method": q, "params": params}
    else:
        step = {"method": next((m for m in space.quant_methods if m != "none"), "bnb_int8"), "params": {}}
    return {"strategy": {"steps": [step]}, "rationale": EXAMPLE_RATIONALE, "objective": "<objective>"}


def _compact(strategy: Strategy) -> list[dict]:
    """Steps with default-valued params dropped, so the history stays short."""
    out = []
    for s in strategy.steps:
        d = METHODS[s.method].params().model_dump() if s.method in METHODS else {}
        out.append({"method": s.method, "params": {k: v for k, v in s.params.items() if d.get(k, object()) != v}})
    return out


def _objs(o: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in o.items())


# ---- tools ----------------------------------------------------------------------------------------------------------

class _StrategyOnly(BaseModel):
    strategy_json: str = Field(description='the strategy as JSON: {"steps": [{"method": ..., "params": {...}}]}')


def planner_tools(ctx) -> list:
    """The read-only subagent helpers, bound to this run's model and device; nothing else is exposed."""
    from langchain_core.tools import StructuredTool

    from acf.coordinator.subagents import estimate_cost_tool, validate_strategy_tool

    model_dir = str(Path(ctx.spec.path))
    device = ctx.cfg.device

    def validate(strategy_json: str) -> dict:
        """Check a strategy without running it: the filled-in strategy or every problem found."""
        return validate_strategy_tool(strategy_json, model_dir, device)

    def estimate(strategy_json: str) -> dict:
        """A rough wall-time ESTIMATE per step (not a measurement)."""
        return estimate_cost_tool(strategy_json, model_dir, device, params_count=ctx.spec.params)

    return [StructuredTool.from_function(func=validate, name="validate_strategy", args_schema=_StrategyOnly,
                                         description=validate.__doc__),
            StructuredTool.from_function(func=estimate, name="estimate_cost", args_schema=_StrategyOnly,
                                         description=estimate.__doc__)]
