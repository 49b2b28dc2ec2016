"""Nominal bits per weight of a quantization step: what its params ask for, before anything runs.

The search predicts a proposal's size and damage from these (acf.search.surrogate); they are declared per method
in the registry (`MethodSpec.stored_bits`) so each method says once what its settings cost. They are the bytes the
format stores per quantized Linear weight (values, scales, shapes, as acf.methods.mixed counts them), not a
measurement: the measured size of every candidate is what the frontier uses.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

#: a step's params and the model spec -> bits per quantized Linear weight (None: not known from the params alone)
BitsFn = Callable[[dict, Any], Optional[float]]


def quantizable_shapes(spec: Any, ignore: tuple[str, ...] = ("lm_head",)) -> list:
    """The Linear layers a weight quantizer targets (lm_head ignored, as every acf quantizer does by default)."""
    from acf.methods.mixed import LayerShape

    return [LayerShape(name=l.name, out_features=l.out_features, in_features=l.in_features) for l in spec.linears
            if not any(l.name == i or l.name.endswith("." + i) for i in ignore)]


def format_bits(fmt: str, spec: Any) -> float:
    """Bits per weight of one compressed-tensors format ("w4g64", "w8") on every quantizable layer of `spec`
    (layers the group does not divide counted per channel, as the quantizer would refuse them otherwise)."""
    from acf.methods.mixed import effective_bits, parse_format

    layers = quantizable_shapes(spec)
    f = parse_format(fmt)
    fallback = f"w{f.bits}"
    formats = {l.name: (fmt if f.fits(l.in_features) else fallback) for l in layers}
    return effective_bits(layers, formats, spec.bytes_per_param)


def int_weights(default_bits: Optional[int] = None, zero_point_default: bool = False) -> BitsFn:
    """Integer weight formats (GPTQ, AWQ, RTN, AutoRound): `avg_bits` when the step allocates, else `bits` at
    `group_size` (an asymmetric format stores a zero point per group too: counted as a second scale)."""

    def fn(params: dict, spec: Any) -> Optional[float]:
        if params.get("avg_bits") is not None:
            return float(params["avg_bits"])
        if params.get("layer_formats"):
            from acf.methods.mixed import effective_bits

            layers = [l for l in quantizable_shapes(spec) if l.name in params["layer_formats"]]
            return effective_bits(layers, dict(params["layer_formats"]), spec.bytes_per_param) if layers else None
        bits = int(params.get("bits", default_bits or 4))
        g = params.get("group_size", 64)
        fmt = f"w{bits}" + (f"g{int(g)}" if g else "")
        b = format_bits(fmt, spec)
        if not params.get("symmetric", not zero_point_default) and g:
            b += 8 * spec.bytes_per_param / int(g)
        return b

    return fn


def constant(bits: float) -> BitsFn:
    """A format whose size does not depend on its params (W8A8, bitsandbytes)."""
    return lambda params, spec: bits


def gguf_bits(params: dict, spec: Any) -> Optional[float]:
    """A GGUF step: its budget (`avg_bits`, embedding included), else its file type's main tensor type in ggml's
    block sizes (Q4_K_M from acf.methods.gguf_mixed's estimate)."""
    from acf.methods.gguf_mixed import q4km_bits_estimate, shapes_from_spec, type_size

    if params.get("avg_bits") is not None:
        return float(params["avg_bits"])
    t = str(params.get("type", "Q4_K_M")).upper()
    if t == "Q4_K_M":
        return q4km_bits_estimate(shapes_from_spec(spec))
    main = {"Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_S": "Q4_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
            "Q2_K": "Q2_K"}.get(t, t)
    try:
        block, nbytes = type_size(main)
    except (KeyError, ValueError):
        return None
    return 8 * nbytes / block
