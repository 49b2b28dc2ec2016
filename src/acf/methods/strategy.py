"""Strategies: an ordered list of compression steps, validated against the model spec before anything runs.

Validation is a pure function of (strategy, spec, device): it needs no model weights, so the search, the
LLM planner and the CLI all reject bad strategies the same way and early.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acf.core.errors import StrategyError
from acf.methods.params import MixedPrecision
from acf.methods.registry import all_methods
from acf.methods.vllm_rules import format_problem, fused_groups

#: name -> MethodSpec: the live method registry (acf.methods.registry), where every method is declared once
METHODS = all_methods()

_KIND_ORDER = {"prune": 0, "distill": 1, "lora": 1, "quantize": 2, "tune": 3}


def kind_of(method: str) -> Optional[str]:
    """The kind of a declared method (quantize, prune, distill, lora), None for an unknown name."""
    info = METHODS.get(method)
    return None if info is None else info.kind


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: list[Step] = Field(default_factory=list)

    def key(self) -> str:
        """Canonical JSON: equal strategies have equal keys (used to skip duplicate proposals)."""
        return json.dumps(self.model_dump(), sort_keys=True)

    def describe(self) -> str:
        if not self.steps:
            return "baseline (no compression)"
        parts = []
        for s in self.steps:
            info = METHODS.get(s.method)
            defaults = info.params().model_dump() if info is not None else {}
            keep = ("bits", "group_size", "sparsity", "pattern", "count", "by", "steps", "rank", "avg_bits", "type",
                    "imatrix")
            if s.params.get("avg_bits") is not None or s.params.get("layer_formats"):
                # an allocation replaces the uniform format (and a gguf file type, which then names nothing)
                keep = tuple(k for k in keep if k not in ("bits", "group_size", "type"))
            hide = ("ignore", "targets", "layer_formats") + (("type",) if s.params.get("avg_bits") is not None else ())
            ps = ",".join(f"{k}={v}" for k, v in s.params.items()
                          if (k in keep and v is not None) or (k in defaults and v != defaults[k] and k not in hide))
            if s.params.get("layer_formats"):
                ps += (",") if ps else ""
                ps += f"layer_formats=<{len(s.params['layer_formats'])} layers>"
            parts.append(f"{s.method}({ps})")
        return " -> ".join(parts)


def parse_strategy(obj: Union[str, dict, Strategy, Path]) -> Strategy:
    """Accept a Strategy, a dict, inline JSON, or a path to a JSON file."""
    if isinstance(obj, Strategy):
        return obj
    src = "strategy"
    if isinstance(obj, Path) or (isinstance(obj, str) and not obj.lstrip().startswith(("{", "["))):
        p = Path(obj)
        if not p.is_file():
            raise StrategyError([f"{obj}: not a JSON object and not an existing file"])
        src, obj = str(p), p.read_text()
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise StrategyError([f"{src} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]) from None
    if isinstance(obj, list):
        obj = {"steps": obj}
    if not isinstance(obj, dict):
        raise StrategyError([f"{src} must be a JSON object with a 'steps' list"])
    try:
        return Strategy.model_validate(obj)
    except ValidationError as e:
        raise StrategyError([_fmt_err(er) for er in e.errors()]) from None


def _fmt_err(er: dict) -> str:
    loc = ".".join(str(x) for x in er.get("loc", ()))
    return f"{loc}: {er.get('msg')}" if loc else er.get("msg", "invalid")


def validate_strategy(obj: Union[str, dict, Strategy], spec=None, device: str = "cpu") -> Strategy:
    """Return the strategy with every parameter filled with its default, or raise StrategyError listing all problems.

    Checks: known method; parameter names, types and ranges; group sizes dividing every targeted layer width;
    N:M patterns; layer counts; order (prune -> distill/lora -> quantize -> tune, one quantization step, QLoRA
    only right after bnb_nf4, a tune step only right after a weight-only compressed-tensors quantizer); methods that
    need CUDA.
    """
    strat = parse_strategy(obj)
    problems: list[str] = []
    filled: list[Step] = []
    kinds: list[str] = []
    for i, step in enumerate(strat.steps):
        where = f"step {i + 1} ({step.method})"
        info = METHODS.get(step.method)
        if info is None:
            problems.append(f"{where}: unknown method {step.method!r}; known: {', '.join(METHODS)}")
            kinds.append("?")
            continue
        try:
            params = info.params.model_validate(step.params)
        except ValidationError as e:
            problems += [f"{where}: {_fmt_err(er)}" for er in e.errors()]
            kinds.append(info.kind)
            gs = step.params.get("group_size")  # still report a bad group size alongside the other problems
            if info.group_sized and isinstance(gs, int) and spec is not None and spec.group_size_problem(gs):
                problems.append(f"{where}: group_size {gs} does not divide every targeted layer width; "
                                f"valid for this model: {spec.valid_group_sizes}")
            continue
        problems += _check_params(where, step.method, params, spec)
        problems += _check_mixed(where, params, spec)
        if info.check is not None:   # the method's own rules (acf.methods.checks)
            problems += info.check(where, params, spec, device)
        if info.needs_cuda and not device.startswith("cuda"):
            problems.append(f"{where}: needs CUDA, but the device is {device}")
        kinds.append(info.kind)
        filled.append(Step(method=step.method, params=params.model_dump()))
    problems += _check_order(strat.steps, kinds)
    if problems:
        raise StrategyError(problems)
    return Strategy(steps=filled)


def _check_params(where: str, method: str, p: BaseModel, spec) -> list[str]:
    out = []
    gs = getattr(p, "group_size", None)
    if METHODS[method].group_sized and gs is not None:
        if gs <= 0 or gs & (gs - 1):
            out.append(f"{where}: group_size {gs} must be a positive power of two (or null for per-channel)")
        elif spec is not None:
            bad = spec.group_size_problem(gs, tuple(getattr(p, "ignore", ["lm_head"])))
            if bad:
                out.append(f"{where}: group_size {gs} does not divide the input width of {len(bad)} layer(s), "
                           f"e.g. {', '.join(bad[:3])}; valid for this model: {spec.valid_group_sizes}")
    pat = getattr(p, "pattern", None)
    if pat is not None and pat != "unstructured":
        try:
            n, m = (int(x) for x in pat.split(":"))
            if not (0 < n < m):
                raise ValueError
            sp = getattr(p, "sparsity", None)
            if sp is not None and abs(sp - (1 - n / m)) > 1e-6:
                out.append(f"{where}: pattern {pat} implies sparsity {1 - n / m:g}, but sparsity is {sp:g}")
        except ValueError:
            out.append(f"{where}: pattern {pat!r} must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4')")
    return out


def _check_mixed(where: str, p: BaseModel, spec) -> list[str]:
    """Mixed precision: formats that parse, a budget the palette can reach on this model, an explicit allocation
    that names the model's layers with formats their widths take; under target "vllm" also formats vLLM's kernels
    serve, one format per fused layer, and an ignore list of whole fused layers (acf.methods.vllm_rules). Pure
    (spec shapes only)."""
    if not isinstance(p, MixedPrecision) or (p.avg_bits is None and not p.layer_formats):
        return []
    from acf.methods.mixed import LayerShape, below_minimum, min_effective_bits, parse_format

    out = []
    if p.avg_bits is not None and p.layer_formats:
        out.append(f"{where}: give avg_bits (allocate) or layer_formats (replay), not both")
    names = list(p.formats or []) + sorted(set((p.layer_formats or {}).values()))
    for f in names:
        try:
            parse_format(f)
        except ValueError as e:
            out.append(f"{where}: {e}")
    if out:
        return out
    if p.target == "vllm":
        out += _vllm_formats(where, list(p.formats or []))
    if out or spec is None:
        return out
    ignore = tuple(getattr(p, "ignore", ["lm_head"]))
    ignored = [l for l in spec.linears if any(l.name == i or l.name.endswith("." + i) or l.name.endswith(i)
                                              for i in ignore)]
    shapes = [LayerShape(name=l.name, out_features=l.out_features, in_features=l.in_features) for l in spec.linears
              if l not in ignored]
    if p.target == "vllm":
        out += _vllm_ignore(where, [l.name for l in ignored], [s.name for s in shapes], spec.family)
    if p.layer_formats:
        by = {s.name: s for s in shapes}
        unknown = sorted(set(p.layer_formats) - set(by))
        missing = sorted(set(by) - set(p.layer_formats))
        if unknown or missing:
            out.append(f"{where}: layer_formats must name every quantizable layer: {len(missing)} missing "
                       f"(e.g. {', '.join(missing[:2])}), {len(unknown)} unknown (e.g. {', '.join(unknown[:2])})")
        bad = [f"{n} ({f}, {by[n].in_features} wide)" for n, f in p.layer_formats.items()
               if n in by and not parse_format(f).fits(by[n].in_features)]
        if bad:
            out.append(f"{where}: group size does not divide the input width of {', '.join(bad[:3])}")
        if p.target == "vllm" and not bad:
            from acf.methods.mixed_step import replay_problems

            split = replay_problems(p.layer_formats, shapes, spec.family)
            if split:
                out.append(f"{where}: layer_formats cannot load in vLLM (target vllm): {'; '.join(split[:3])}"
                           f"{f' (+{len(split) - 3} more)' if len(split) > 3 else ''}; give target 'transformers' "
                           f"to keep them")
        return out
    from acf.methods.mixed_step import palette

    formats = palette({"formats": p.formats, "target": p.target}, shapes)
    lo = min_effective_bits(shapes, formats, spec.bytes_per_param, p.target, spec.family)
    if below_minimum(p.avg_bits, lo):   # the rule `allocate` applies, so what validates allocates
        out.append(f"{where}: avg_bits {p.avg_bits:g} is below the smallest size the formats {', '.join(formats)} "
                   f"reach on this model ({lo:.3f} bits per weight"
                   + (", one format per fused layer, target vllm)" if p.target == "vllm" else ")"))
    return out


def _vllm_formats(where: str, formats: list[str]) -> list[str]:
    """Palette formats vLLM's kernels serve at no shape (target vllm)."""
    from acf.methods.mixed import parse_format

    bad = [f"{f} ({why})" for f in formats if not parse_format(f).keep
           and (why := format_problem(parse_format(f).bits, parse_format(f).group))]
    return [f"{where}: formats not served by vLLM (target vllm): {'; '.join(bad)}; give target 'transformers' to "
            f"allocate them"] if bad else []


def _vllm_ignore(where: str, ignored: list[str], kept: list[str], family: Optional[str]) -> list[str]:
    """An ignore list that keeps part of a fused layer in 16 bits (vLLM refuses: one scheme per fused layer)."""
    ig = set(ignored)
    split = [k for k, members in fused_groups(ignored + kept, family).items()
             if len(members) > 1 and 0 < sum(m in ig for m in members) < len(members)]
    return [f"{where}: ignore covers part of fused layer(s) {', '.join(split[:3])}; vLLM loads q/k/v (gate/up) as one "
            f"layer with one scheme (target vllm): ignore all of its shards or none"] if split else []


def _check_order(steps: list[Step], kinds: list[str]) -> list[str]:
    out = []
    n_quant = sum(k == "quantize" for k in kinds)
    q_methods = [s.method for s, k in zip(steps, kinds) if k == "quantize"]
    if n_quant > 1:
        out.append(f"only one quantization step is allowed (got {', '.join(q_methods)})")
    last = -1
    for i, (s, k) in enumerate(zip(steps, kinds)):
        if k == "?":
            continue
        is_qlora = s.method == "lora" and bool(s.params.get("qlora"))
        if is_qlora:
            prev = steps[i - 1].method if i > 0 else None
            if prev != "bnb_nf4":
                out.append(f"step {i + 1} (lora): qlora needs a bnb 4-bit base, so the step before must be bnb_nf4"
                           f" (got {prev or 'nothing'})")
            continue
        if k == "tune":
            prev = METHODS.get(steps[i - 1].method) if i > 0 else None
            if prev is None or prev.kind != "quantize" or not prev.tunable:
                ok = ", ".join(m for m, inf in METHODS.items() if inf.tunable)
                out.append(f"step {i + 1} ({s.method}): trains what a weight-only quantization kept in 16 bits, so "
                           f"the step before must be one of {ok} (got {steps[i - 1].method if i > 0 else 'nothing'})")
        rank = _KIND_ORDER[k]
        if rank < last:
            out.append(f"step {i + 1} ({s.method}): order must be prune -> distill/lora -> quantize -> tune; a {k} "
                       f"step cannot follow a later stage")
        last = max(last, rank)
    return out


def method_table() -> list[dict]:
    """The methods with their parameters and defaults (for `acf methods`, agent cards and the planner)."""
    rows = []
    for m in METHODS.values():
        schema = m.params.model_json_schema()
        rows.append({"method": m.name, "kind": m.kind, "library": m.library, "description": m.description,
                     "params": {k: {kk: vv for kk, vv in v.items() if kk in ("default", "type", "enum", "minimum",
                                                                               "maximum", "description", "anyOf")}
                                for k, v in schema.get("properties", {}).items()}})
    return rows
