"""Conformance of a saved compressed-tensors model to vLLM's loader rules, without vLLM.

Why: vLLM fuses q/k/v and gate/up into one layer with one scheme and serves int weights only through some kernels
(acf.methods.vllm_rules, with the vLLM source files each rule comes from). A per-layer allocation can break either
rule and transformers would still load it, so a model acf writes must be checked before anyone is told it deploys.
vLLM cannot be imported here (a GPU server, its own torch), so the check reads what vLLM reads — config.json's
`quantization_config` (config_groups targets and weights, ignore list) and the safetensors headers (tensor names and
shapes) — and applies the rules. A model that passes is "checked by rules", never "loads": nothing was loaded.

Pure apart from reading the files (the `safetensors` library for headers; the 2-value `weight_shape` tensors are
read to know each packed layer's unpacked shape).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from acf.methods.vllm_rules import VLLM_READ, fused_groups, wna16_problem

#: the weights arguments that make a scheme: two groups equal in these are one scheme to vLLM's loader
_SCHEME_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "dynamic")


@dataclass(frozen=True)
class Violation:
    """One broken rule: the (vLLM) layer it concerns, the rule's name, and what was found."""

    layer: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.rule}: {self.detail}"


@dataclass
class _Layer:
    name: str
    shape: Optional[tuple[int, int]]   # (out, in) unpacked
    packed: Optional[tuple[int, ...]]  # weight_packed's stored shape, None for a dense weight
    scale: Optional[tuple[int, ...]]


def _read_tensors(model_dir: Path) -> dict[str, _Layer]:
    """The model's 2-D weights by layer name, from the safetensors headers (plus each packed layer's weight_shape)."""
    from safetensors import safe_open

    layers: dict[str, _Layer] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                base, _, suffix = key.rpartition(".")
                shape = tuple(f.get_slice(key).get_shape())
                if suffix == "weight" and len(shape) == 2:
                    layers.setdefault(base, _Layer(base, None, None, None)).shape = (shape[0], shape[1])
                elif suffix == "weight_packed":
                    layers.setdefault(base, _Layer(base, None, None, None)).packed = shape
                elif suffix == "weight_scale":
                    layers.setdefault(base, _Layer(base, None, None, None)).scale = shape
                elif suffix == "weight_shape":
                    vals = [int(v) for v in f.get_tensor(key).reshape(-1)]
                    layers.setdefault(base, _Layer(base, None, None, None)).shape = (vals[0], vals[1])
    return layers


def _matches(name: str, target: str) -> bool:
    """compressed-tensors / vLLM target matching of a layer name: exact, or a 're:' regex from the start
    (vLLM `layers/quantization/utils/config_utils.py` is_equal_or_regex_match)."""
    import re

    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


def _is_class_target(target: str) -> bool:
    return not target.startswith("re:") and "." not in target


def _scheme_of(name: str, packed: bool, groups: dict[str, dict], ignore: list[str]) -> Optional[str]:
    """The config group a layer gets: ignored -> None; else the first exact/regex target; else, for a packed layer,
    the first class-name target such as "Linear" (vLLM find_matched_target's order)."""
    if any(_matches(name, t) for t in ignore):
        return None
    for g, cfg in groups.items():
        if any(_matches(name, t) for t in cfg.get("targets") or [] if not _is_class_target(t)):
            return g
    if packed:
        for g, cfg in groups.items():
            if any(_is_class_target(t) for t in cfg.get("targets") or []):
                return g
    return None


def _scheme_key(cfg: Optional[dict]) -> Optional[tuple]:
    if cfg is None:
        return None
    w = cfg.get("weights") or {}
    return tuple(w.get(k) for k in _SCHEME_KEYS)


def _scheme_name(cfg: Optional[dict]) -> str:
    if cfg is None:
        return "unquantized"
    w = cfg.get("weights") or {}
    g = w.get("group_size")
    return f"w{w.get('num_bits')}" + (f"g{g}" if g else "") + ("" if w.get("symmetric", True) else " asym")


def _wna16_problem(cfg: dict, fmt: Optional[str]) -> Optional[str]:
    """Why a config group is not vLLM's weight-only int scheme (CompressedTensorsWNA16), or None when it is."""
    w = cfg.get("weights") or {}
    if cfg.get("input_activations") or w.get("type") != "int":
        return "not a weight-only int scheme (CompressedTensorsWNA16): outside what this check covers"
    if w.get("strategy") not in ("group", "channel") or w.get("dynamic"):
        return f"strategy {w.get('strategy')!r}{' dynamic' if w.get('dynamic') else ''}: WNA16 takes static group " \
               f"or channel (compressed_tensors.py _is_wNa16_group_channel)"
    if (cfg.get("format") or fmt) != "pack-quantized":
        return f"format {cfg.get('format') or fmt!r}: WNA16 is read only from pack-quantized"
    if w.get("actorder") in ("group", "dynamic"):
        return f"actorder {w['actorder']!r} is refused at config parse (_quantization_scheme_map_from_config)"
    return None


def _tensor_problem(layer: _Layer, cfg: dict) -> Optional[str]:
    """Why a packed layer's stored tensors do not have the shapes its scheme declares (vLLM's WNA16 create_weights
    allocates out x ceil(in*bits/32) int32 and out x in/group scales), or None."""
    if layer.shape is None or layer.packed is None:
        return "packed weights without a weight_shape" if layer.packed is not None else None
    w = cfg.get("weights") or {}
    out, inn = layer.shape
    bits, g = int(w.get("num_bits") or 0), w.get("group_size")
    want_packed = (out, math.ceil(inn * bits / 32))
    if tuple(layer.packed) != want_packed:
        return f"weight_packed {list(layer.packed)} but {_scheme_name(cfg)} on {out}x{inn} is {list(want_packed)}"
    want_scale = (out, inn // g if g else 1)
    if layer.scale is not None and tuple(layer.scale) != want_scale:
        return f"weight_scale {list(layer.scale)} but {_scheme_name(cfg)} on {out}x{inn} is {list(want_scale)}"
    return None


def check_vllm(model_dir: str | Path, family: Optional[str] = None) -> list[Violation]:
    """The vLLM loader rules (acf.methods.vllm_rules) a saved compressed-tensors model breaks, one Violation per
    (fused) layer and rule: fused layers share one scheme; the ignore list covers whole fused layers; each scheme is
    weight-only int, pack-quantized, with an activation order vLLM accepts; vLLM's kernels serve its bits and group
    on the fused shape; stored tensors match the declared scheme. [] for a model with no compressed-tensors config
    (nothing quantized to check). `family` (HF model_type) defaults to config.json's."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    qc: dict[str, Any] = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return []
    family = family or config.get("model_type")
    groups: dict[str, dict] = qc.get("config_groups") or {}
    ignore: list[str] = list(qc.get("ignore") or [])
    layers = _read_tensors(model_dir)
    out: list[Violation] = []
    scheme = {n: _scheme_of(n, l.packed is not None, groups, ignore) for n, l in layers.items()}
    for n, l in layers.items():
        if l.packed is not None and scheme[n] is None:
            out.append(Violation(n, "tensors", "packed weights, but no config group targets it (or it is ignored)"))
        elif l.packed is None and scheme[n] is not None:
            out.append(Violation(n, "tensors", f"stored dense, but config group {scheme[n]} targets it"))
        elif l.packed is not None and (why := _tensor_problem(l, groups[scheme[n]])):
            out.append(Violation(n, "tensors", why))
    for key, members in fused_groups(layers, family).items():
        cfgs = [groups.get(scheme[m]) if scheme[m] else None for m in members]
        if len(members) > 1:
            ignored = [any(_matches(m, t) for t in ignore) for m in members]
            if any(ignored) and not all(ignored):
                which = [m.rsplit(".", 1)[-1] for m, i in zip(members, ignored) if i]
                out.append(Violation(key, "fused-ignore", f"ignore lists {', '.join(which)} but not every shard "
                                     f"(vLLM utils.py should_ignore_layer: 'Found different quantization schemes "
                                     f"for the shards')"))
                continue
            if len({_scheme_key(c) for c in cfgs}) > 1:
                shards = ", ".join(f"{m.rsplit('.', 1)[-1]}={_scheme_name(c)}" for m, c in zip(members, cfgs))
                out.append(Violation(key, "fused-scheme", f"shards in different schemes ({shards}); vLLM loads one "
                                     f"fused layer with one scheme (utils.py _match_fused_layer)"))
                continue
        cfg = cfgs[0]
        if cfg is None:
            continue
        why = _wna16_problem(cfg, qc.get("format"))
        if why:
            out.append(Violation(key, "scheme", why))
            continue
        w = cfg["weights"]
        shapes = [layers[m].shape for m in members]
        if any(s is None for s in shapes):
            continue
        n_out = sum(s[0] for s in shapes)   # type: ignore[index]
        why = next((p for s in shapes if (p := wna16_problem(int(w["num_bits"]), w.get("group_size"),
                                                             s[1], n_out, bool(w.get("symmetric", True))))), None)
        if why:
            out.append(Violation(key, "kernel", f"{_scheme_name(cfg)} on {shapes[0][1]} -> {n_out}: {why}"))
    return out


def verdict(found: list[Violation]) -> dict:
    """What a step record says of its output: conforms or not, the violations, and that this was checked by rules
    read from one vLLM version, not by loading it."""
    return {"conforms": not found, "checked": f"by rules against {VLLM_READ}; not loaded",
            "violations": [str(v) for v in found]}
