"""Subagent cards (agents/*.md) bound to langchain-core tools.

A card is markdown with YAML front matter (name, description, tools, search_space) and a role prompt body. Each
tool is a thin `StructuredTool` over the real implementation (methods runner, evaluation, strategy validation),
with a pydantic argument schema so an LLM planner gets typed, validated calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from pydantic import BaseModel, Field

from acf.core.errors import AcfError, StrategyError

CARD_FIELDS = ("name", "description", "tools", "search_space")


class AgentCard(BaseModel):
    name: str
    description: str
    tools: list[str]
    search_space: dict[str, Any] = Field(default_factory=dict)
    prompt: str = ""
    path: Optional[str] = None


def agents_dir() -> Path:
    env = os.environ.get("ACF_AGENTS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "agents"


def parse_card(text: str, path: Optional[str] = None) -> AgentCard:
    """Split '---\\n<yaml>\\n---\\n<body>' and validate the front matter."""
    where = path or "card"
    if not text.startswith("---"):
        raise AcfError(f"{where}: a card must start with YAML front matter between '---' lines")
    parts = text.split("\n---", 1)
    if len(parts) != 2:
        raise AcfError(f"{where}: front matter is not closed by a '---' line")
    head = parts[0][3:]
    body = parts[1].split("\n", 1)[1] if "\n" in parts[1] else ""
    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError as e:
        raise AcfError(f"{where}: front matter is not valid YAML ({e})") from None
    missing = [k for k in ("name", "description", "tools") if k not in meta]
    if missing:
        raise AcfError(f"{where}: front matter lacks {', '.join(missing)}")
    unknown = [t for t in meta["tools"] if t not in TOOL_SPECS]
    if unknown:
        raise AcfError(f"{where}: unknown tool(s) {unknown}; known: {sorted(TOOL_SPECS)}")
    return AgentCard(**{k: meta[k] for k in CARD_FIELDS if k in meta}, prompt=body.strip(), path=path)


def load_cards(directory: Optional[Path] = None) -> dict[str, AgentCard]:
    """The cards, each offering the methods the registry assigns to it (MethodSpec.card) with their ranges: the
    registry is the source, the files' `methods` blocks are its generated copy (`sync_cards`, checked by a test)."""
    d = Path(directory) if directory else agents_dir()
    if not d.is_dir():
        raise AcfError(f"agent cards directory {d} does not exist")
    cards = {}
    for p in sorted(d.glob("*.md")):
        c = parse_card(p.read_text(encoding="utf-8"), str(p))
        ranges = card_methods(c.name)
        if ranges:
            c.search_space = {**c.search_space, "methods": ranges}
        cards[c.name] = c
    return cards


def card_methods(card: str) -> dict[str, dict[str, Any]]:
    """{method: useful ranges} of the registry's methods offered by the card named `card`."""
    from acf.methods.registry import all_methods

    return {m.name: dict(m.card_ranges) for m in all_methods().values() if m.card == card}


def render_methods_block(card: str) -> str:
    """The `methods:` block of a card's front matter, generated from the registry (one flow-style line each)."""
    lines = ["  methods:"]
    for name, ranges in card_methods(card).items():
        lines.append("    " + yaml.safe_dump({name: ranges}, default_flow_style=True, width=10_000,
                                             sort_keys=False).strip().removeprefix("{").removesuffix("}"))
    return "\n".join(lines)


def sync_cards(directory: Optional[Path] = None) -> list[Path]:
    """Rewrite each card's `methods:` block from the registry; returns the files that changed. Run
    `python -m acf.coordinator.subagents` after declaring a method."""
    d = Path(directory) if directory else agents_dir()
    changed = []
    for p in sorted(d.glob("*.md")):
        text = p.read_text(encoding="utf-8")
        name = parse_card(text, str(p)).name
        lines = text.split("\n")
        if "  methods:" not in lines:
            continue
        i = lines.index("  methods:")
        j = i + 1
        while j < len(lines) and lines[j].startswith("    "):
            j += 1
        new = "\n".join(lines[:i] + render_methods_block(name).split("\n") + lines[j:])
        if new != text:
            p.write_text(new, encoding="utf-8")
            changed.append(p)
    return changed


# --- tool argument schemas ---------------------------------------------------------------------------------------

class _RunArgs(BaseModel):
    model_dir: str = Field(description="input model directory (HF checkpoint)")
    out_dir: str = Field(description="where the compressed model is written (must not be the input)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters; defaults fill the rest")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    task: str = Field("gsm8k", description="task whose train split supplies calibration/training text")


class QuantizeArgs(_RunArgs):
    method: str = Field(description="a quantize method (`acf methods` lists them)")


class PruneArgs(_RunArgs):
    method: str = Field(description="a prune method (`acf methods` lists them)")


class DistillArgs(_RunArgs):
    teacher_dir: str = Field(description="the uncompressed original model (the teacher)")


class LoraArgs(_RunArgs):
    pass


class EvaluateArgs(BaseModel):
    model_dir: str
    metrics: list[str] = Field(default_factory=lambda: ["answer_nll", "size"])
    limit: int = Field(50, ge=1, description="test items")
    task: str = "gsm8k"
    device: str = "cpu"


class StrategyArgs(BaseModel):
    strategy_json: str = Field(description='JSON: {"steps": [{"method": ..., "params": {...}}, ...]} or a list')
    model_dir: Optional[str] = Field(None, description="model to check group sizes / layer counts against")
    device: str = "cpu"


# --- tool functions (thin) ---------------------------------------------------------------------------------------

def _run_one(kind: str, method: str, model_dir: str, out_dir: str, params: dict, device: str, task: str,
             teacher_dir: Optional[str] = None) -> dict:
    from acf.methods.base import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import resolve_device
    from acf.methods.strategy import METHODS, validate_strategy as _validate
    from acf.tasks import get_task

    info = METHODS.get(method)
    if info is None or info.kind != kind:
        ok = [m for m, i in METHODS.items() if i.kind == kind]
        return {"status": "failed", "reason": f"{method!r} is not a {kind} method; choose from {ok}"}
    if Path(out_dir).resolve() == Path(model_dir).resolve():
        return {"status": "failed", "reason": "out_dir must differ from model_dir"}
    try:
        dev = resolve_device(device)
        strat = _validate({"steps": [{"method": method, "params": params}]}, _spec_or_none(model_dir), dev)
    except (StrategyError, AcfError) as e:
        return {"status": "failed", "reason": str(e)}
    ctx = StepContext(device=dev, task=get_task(task), teacher_dir=Path(teacher_dir) if teacher_dir else None)
    recs = run_strategy(strat, Path(model_dir), Path(out_dir), ctx)
    return recs[-1].model_dump() if recs else {"status": "failed", "reason": "no step ran"}


def _spec_or_none(model_dir: Optional[str]):
    if not model_dir:
        return None
    from acf.models.spec import infer_spec

    try:
        return infer_spec(model_dir)
    except Exception:  # a spec is a help for validation, not a requirement
        return None


def quantize_tool(model_dir: str, out_dir: str, method: str, params: Optional[dict] = None, device: str = "cpu",
                  task: str = "gsm8k") -> dict:
    """Quantize the model in model_dir into out_dir with one method; returns the measured step record."""
    return _run_one("quantize", method, model_dir, out_dir, params or {}, device, task)


def prune_tool(model_dir: str, out_dir: str, method: str, params: Optional[dict] = None, device: str = "cpu",
               task: str = "gsm8k") -> dict:
    """Prune weights or drop decoder blocks; returns the measured step record (sparsity / dropped layers)."""
    return _run_one("prune", method, model_dir, out_dir, params or {}, device, task)


def distill_tool(model_dir: str, out_dir: str, teacher_dir: str, params: Optional[dict] = None, device: str = "cpu",
                 task: str = "gsm8k") -> dict:
    """Distil teacher_dir into the student in model_dir; returns the step record with the loss curve."""
    return _run_one("distill", "distill", model_dir, out_dir, params or {}, device, task, teacher_dir)


def lora_tool(model_dir: str, out_dir: str, params: Optional[dict] = None, device: str = "cpu",
              task: str = "gsm8k") -> dict:
    """LoRA (or QLoRA) recovery fine-tune, merged; returns the step record with the loss curve."""
    return _run_one("lora", "lora", model_dir, out_dir, params or {}, device, task)


def evaluate_tool(model_dir: str, metrics: Optional[list[str]] = None, limit: int = 50, task: str = "gsm8k",
                  device: str = "cpu") -> dict:
    """Measure metrics for model_dir on the task's test split; returns {metric: {value, unit, ...}}."""
    from acf.evaluation import evaluate
    from acf.models.loading import resolve_device
    from acf.tasks import get_task

    try:
        res = evaluate(model_dir, get_task(task), metrics or ["answer_nll", "size"], limit=limit,
                       device=resolve_device(device), show_progress=False)
    except AcfError as e:
        return {"status": "failed", "reason": str(e)}
    return {"status": "ok", "model_dir": str(model_dir), "task": task,
            "metrics": {k: m.model_dump() for k, m in res.metrics.items()}}


def validate_strategy_tool(strategy_json: str, model_dir: Optional[str] = None, device: str = "cpu") -> dict:
    """Check a strategy without running it: returns the filled-in strategy or every problem found."""
    from acf.methods.strategy import validate_strategy as _validate

    try:
        s = _validate(strategy_json, _spec_or_none(model_dir), device)
    except StrategyError as e:
        return {"ok": False, "problems": e.problems}
    return {"ok": True, "strategy": s.model_dump(), "describe": s.describe()}


def estimate_cost_tool(strategy_json: str, model_dir: Optional[str] = None, device: str = "cpu",
                       params_count: Optional[int] = None) -> dict:
    """A rough wall-time ESTIMATE per step from the step's params and the model's size (not a measurement)."""
    from acf.methods.registry import estimate_step_seconds
    from acf.methods.strategy import validate_strategy as _validate

    spec = _spec_or_none(model_dir)
    try:
        s = _validate(strategy_json, spec, device)
    except StrategyError as e:
        return {"ok": False, "problems": e.problems}
    n = params_count or (spec.params if spec is not None else 135_000_000)
    steps = [{"method": st.method, "estimated_seconds": estimate_step_seconds(st.method, st.params, n, device)}
             for st in s.steps]
    return {"ok": True, "estimate": True, "device": "cuda" if device.startswith("cuda") else "cpu", "params": n,
            "steps": steps, "total_estimated_seconds": round(sum(x["estimated_seconds"] for x in steps), 1),
            "note": "rough estimate from parameter count and assumed throughput; actual time is measured by the run"}


TOOL_SPECS: dict[str, tuple[Callable[..., Any], type[BaseModel], str]] = {
    "quantize": (quantize_tool, QuantizeArgs, "Run one quantization method on a model directory."),
    "prune": (prune_tool, PruneArgs, "Run one pruning method (weight sparsity or drop_layers) on a model directory."),
    "distill": (distill_tool, DistillArgs, "Knowledge-distil the teacher into the student model directory."),
    "lora": (lora_tool, LoraArgs, "LoRA / QLoRA recovery fine-tune, merged into the weights."),
    "evaluate": (evaluate_tool, EvaluateArgs, "Measure task quality and cost metrics of a model directory."),
    "validate_strategy": (validate_strategy_tool, StrategyArgs, "Validate a strategy JSON without running it."),
    "estimate_cost": (estimate_cost_tool, StrategyArgs, "Rough wall-time ESTIMATE per step of a strategy."),
}


def make_tool(name: str):
    from langchain_core.tools import StructuredTool

    fn, schema, desc = TOOL_SPECS[name]
    return StructuredTool.from_function(func=fn, name=name, description=f"{desc} {fn.__doc__ or ''}".strip(),
                                        args_schema=schema)


def tools_for(card: AgentCard) -> list:
    """The card's tools as langchain StructuredTools (read-only helpers included)."""
    return [make_tool(t) for t in card.tools]


def bind_cards(directory: Optional[Path] = None) -> dict[str, tuple[AgentCard, list]]:
    """Every card with its bound tools: {name: (card, [StructuredTool, ...])}."""
    return {n: (c, tools_for(c)) for n, c in load_cards(directory).items()}



if __name__ == "__main__":
    for _p in sync_cards():
        print(f"updated {_p}")
