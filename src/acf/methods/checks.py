"""Method-specific validation rules, referenced by their registrations (MethodSpec.check).

Each check is pure: (where, filled params, model spec or None, device) -> problems. It sees only the model's shapes
(acf.models.spec.ModelSpec), never its weights, so strategies are refused before any step runs, not inside a library.
The rules every method shares (group sizes, N:M patterns, mixed precision, order, CUDA) stay in acf.methods.strategy.
"""

from __future__ import annotations

from typing import Any, Optional

from acf.models.gguf_file import TENSOR_TYPES, type_problems


def drop_layers(where: str, p: Any, spec: Optional[Any], device: str) -> list[str]:
    """A selection of blocks that exists and leaves at least one block."""
    out = []
    n_layers = spec.num_layers if spec is not None else None
    if p.by == "explicit":
        if not p.layers:
            out.append(f"{where}: by=explicit needs 'layers'")
        elif n_layers is not None and any(l < 0 or l >= n_layers for l in p.layers):
            out.append(f"{where}: layer indices must lie in 0..{n_layers - 1}")
        elif n_layers is not None and len(set(p.layers)) >= n_layers:
            out.append(f"{where}: cannot drop every one of the {n_layers} layers")
    elif p.by == "weight_range":
        if p.weight_range is None:
            out.append(f"{where}: by=weight_range needs 'weight_range': [lo, hi]")
    elif p.count is None and p.ratio is None:
        out.append(f"{where}: give 'count' or 'ratio' of blocks to drop")
    if p.count is not None and n_layers is not None and p.count >= n_layers:
        out.append(f"{where}: count {p.count} must be below the model's {n_layers} layers")
    return out


def gguf(where: str, p: Any, spec: Optional[Any], device: str) -> list[str]:
    """GGUF types whose block size the layer widths admit (found by running every method family on tiny Llama,
    Qwen2/3, Gemma2/3, Mistral and Phi3 models: tests/test_architectures.py)."""
    widths = spec.linear_widths(("lm_head",)) if spec is not None else None
    # with avg_bits every matrix gets its allocated type: the file type then names nothing, its widths don't matter
    out = [f"{where}: {m}" for m in type_problems(p.type, None if p.avg_bits is not None else widths, p.overrides,
                                                   p.strict_shapes)]
    if p.avg_bits is None:
        if p.types:
            out.append(f"{where}: 'types' is the palette of avg_bits; give avg_bits too")
        return out
    from acf.methods.gguf_mixed import DEFAULT_TYPES, min_bits, shapes_from_spec

    if p.overrides:
        out.append(f"{where}: give avg_bits (allocate per tensor) or overrides (types by hand), not both")
    types = list(p.types or DEFAULT_TYPES)
    bad = [t for t in types if t not in TENSOR_TYPES or t == "F32"]
    if bad:
        return out + [f"{where}: unknown tensor type(s) {', '.join(bad)} in types; known: "
                      f"{', '.join(t for t in TENSOR_TYPES if t != 'F32')}"]
    if spec is not None and spec.linears:
        shapes = shapes_from_spec(spec)
        lo = min_bits(shapes, types)
        if p.avg_bits < lo - 1e-6:
            out.append(f"{where}: avg_bits {p.avg_bits:g} is below the smallest size the types {', '.join(types)} "
                       f"reach on this model ({lo:.3f} bits per weight, embedding included)")
    return out


def lora(where: str, p: Any, spec: Optional[Any], device: str) -> list[str]:
    """LoRA targets that name Linear layers of this model: e.g. a model whose projections are named
    c_attn/query_key_value would have peft adapt nothing."""
    if spec is None:
        return []
    leaves = {l.name.rsplit(".", 1)[-1] for l in spec.linears if not l.name.endswith("lm_head")}
    if leaves and not set(p.targets) & leaves:
        return [f"{where}: none of the LoRA targets {p.targets} is a Linear layer of this model; its layers are "
                f"named {', '.join(sorted(leaves))}"]
    return []
