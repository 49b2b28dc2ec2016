"""Per-layer mixed precision under a budget: measure how much each Linear layer's quantization hurts, then choose a
format per layer that minimises the summed damage at a given effective bits per weight.

Why by hand: llm-compressor applies whatever per-layer formats it is given (one `config_groups` entry per format,
exact layer names as targets; compressed-tensors saves them packed and transformers/vLLM load them), but it has no
allocator. ModelOpt's AutoQuantize and AutoRound's AutoScheme allocate bits, but inside their own quantizers and
formats, not for llm-compressor's GPTQ/RTN/AutoRound output nor jointly with acf's pruning and recovery steps. What
is left to write is small and model-free where it can be: formats and their byte cost (pure), a Fisher sensitivity
pass (one backward per calibration window), and a multiple-choice knapsack (pure, numpy).

Sensitivity (what it estimates, and why this one): the increase of the mean per-token KL(baseline || quantized) when
only layer l is quantized to format f. At the unquantized model the KL's gradient is zero, so its second-order term
dominates: KL ~= 1/2 dW^T F dW, with F the Fisher information of the model's own next-token distribution. acf keeps
F's diagonal, estimated from gradients of the log-likelihood of tokens *sampled from the model itself* on the task's
calibration windows (the true Fisher, not the empirical Fisher of the reference text: the latter measures
sensitivity of the fit to the task's answers, i.e. task adaptation, not fidelity), and dW = RTN(W, f) - W. One
backward per window gives F for every layer at once, and every format costs only an RTN of the weights, so the pass
scales to 8B models where quantizing each of ~224 layers x formats in turn and re-running the model would not.
`experiments/bench_mixed.py` measures its rank agreement with the direct per-layer KL (`direct_sensitivity`).

Deployment target: transformers loads each Linear in its own format, vLLM does not (it fuses q/k/v and gate/up into
one layer with one scheme, and serves int weights only through some kernels: acf.methods.vllm_rules). Under target
"vllm" the knapsack's items are those fused layers (`items`), each offered only the formats vLLM serves on its fused
shape (`offered`), at its members' summed bytes and sensitivity; under "transformers" every Linear is an item.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from pydantic import BaseModel, Field

from acf.methods.vllm_rules import format_problem, fused_groups, wna16_problem

KEEP = "bf16"   # the layer stays in the model's own 16-bit dtype (listed in the recipe's `ignore`)
_FMT = re.compile(r"^w([2-8])(?:g(\d+))?$")
#: effective bits searched by default (Optuna categorical): uniform W4 g64 is 4.25 with 16-bit scales
DEFAULT_BUDGETS = (4.25, 4.5, 5.0, 6.0)
#: sensitivity estimator version: part of the cache key, so a changed estimator never reads old scores
SENSITIVITY_VERSION = "fisher-sampled-v1"


@dataclass(frozen=True)
class Format:
    """A weight format of one Linear layer: `bits`-bit symmetric integers with one scale per `group` input columns
    (None: one per output channel), or the model's 16-bit dtype (bits=16, name 'bf16')."""

    name: str
    bits: int
    group: Optional[int]

    @property
    def keep(self) -> bool:
        return self.bits >= 16

    def fits(self, in_features: int) -> bool:
        return self.keep or self.group is None or in_features % self.group == 0

    def weights_args(self) -> dict:
        """compressed-tensors QuantizationArgs for this format (as `_weight_args` in quantize.py writes them)."""
        w: dict = {"num_bits": self.bits, "type": "int", "symmetric": True}
        w.update({"strategy": "group", "group_size": self.group} if self.group else {"strategy": "channel"})
        return w


def parse_format(name: str) -> Format:
    """'w4g64' (4 bits, groups of 64), 'w8' (8 bits, per output channel), 'bf16' (kept). ValueError otherwise."""
    if name == KEEP:
        return Format(KEEP, 16, None)
    m = _FMT.match(name)
    if not m:
        raise ValueError(f"format {name!r}: expected 'w<bits>' (per channel), 'w<bits>g<group>' or '{KEEP}', "
                         f"bits 2-8, e.g. w4g64, w8, bf16")
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if group is not None and (group <= 0 or group & (group - 1)):
        raise ValueError(f"format {name!r}: the group size must be a power of two")
    return Format(name, bits, group)


def default_formats(valid_group_sizes: Sequence[int]) -> list[str]:
    """The palette the allocator chooses from when a strategy names none: 3 and 4 bits at the model's largest
    usable group (at most 128), 4 bits at half that group and per channel, 8 bits per channel, and 16-bit kept."""
    gs = [g for g in valid_group_sizes if 32 <= g <= 128] or list(valid_group_sizes) or [32]
    g = max(gs)
    out = [f"w3g{g}", "w4", f"w4g{g}"]
    if g // 2 in valid_group_sizes:
        out.append(f"w4g{g // 2}")
    return out + ["w8", KEEP]


# --- bytes on disk (pure) ----------------------------------------------------------------------------------------

def _header_bytes(name: str, n_tensors: int) -> int:
    # safetensors' JSON header holds one entry per tensor: '"<name>.<suffix>":{"dtype":"I32","shape":[o,i],
    # "data_offsets":[a,b]},' ~ 70 bytes besides the name. Counted so predictions match files within 0.1%.
    return n_tensors * (len(name) + 80)


def layer_bytes(fmt: Format, out_features: int, in_features: int, dense_bytes: int, name: str = "") -> int:
    """Bytes a Linear weight of this format takes in a compressed-tensors `pack-quantized` safetensors file:
    int32-packed values (`weight_packed`: out x ceil(in*bits/32)), scales in the model's dtype (`weight_scale`: out x
    groups), an int64 pair (`weight_shape`); symmetric formats store no zero point, and static act-order no g_idx.
    Checked against files written by llm-compressor 0.14 / compressed-tensors 0.19 (tests/test_mixed.py)."""
    if fmt.keep:
        return out_features * in_features * dense_bytes + _header_bytes(name + ".weight", 1)
    packed = out_features * math.ceil(in_features * fmt.bits / 32) * 4
    groups = in_features // fmt.group if fmt.group else 1
    return packed + out_features * groups * dense_bytes + 16 + _header_bytes(name + ".weight_packed", 3)


class LayerShape(BaseModel):
    name: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def effective_bits(layers: Sequence[LayerShape], formats: dict[str, str], dense_bytes: int) -> float:
    """Bits per weight of the allocated layers: all their bytes (values, scales, shapes, header) x 8 / weights."""
    by = {l.name: l for l in layers}
    total = sum(layer_bytes(parse_format(formats[n]), by[n].out_features, by[n].in_features, dense_bytes, n)
                for n in formats)
    return 8 * total / max(1, sum(by[n].numel for n in formats))


def min_effective_bits(layers: Sequence[LayerShape], formats: Sequence[str], dense_bytes: int,
                       target: str = "transformers", family: Optional[str] = None) -> float:
    """The smallest budget the palette can meet: every allocation item (`items`) at its cheapest format offered
    to it (`offered`)."""
    fmts = [parse_format(f) for f in formats]
    total = 0
    for members in items(layers, target, family):
        fit = [sum(layer_bytes(f, l.out_features, l.in_features, dense_bytes, l.name) for l in members)
               for f in fmts if offered(f, members, target)]
        if not fit:
            return math.inf
        total += min(fit)
    return 8 * total / max(1, sum(l.numel for l in layers))


# --- deployment target (pure) --------------------------------------------------------------------------------------

#: where a compressed-tensors output is meant to run. "vllm": one format per fused layer (q/k/v, gate/up, the
#: experts of an MoE layer) and only formats vLLM's own WNA16 kernels serve (acf.methods.vllm_rules);
#: "transformers": any format per Linear (transformers loads each Linear on its own).
TARGETS = ("vllm", "transformers")


def items(layers: Sequence[LayerShape], target: str = "transformers",
          family: Optional[str] = None) -> list[list[LayerShape]]:
    """What the allocator gives one format each: a fused group of layers under "vllm" (vLLM loads them as one layer
    with one scheme), each layer on its own under "transformers"."""
    if target != "vllm":
        return [[l] for l in layers]

    by = {l.name: l for l in layers}
    return [[by[n] for n in names] for names in fused_groups(by, family).values()]


def offered(fmt: Format, members: Sequence[LayerShape], target: str = "transformers") -> bool:
    """Whether an item may take this format: its group divides every member's input width, and under "vllm" one of
    vLLM's own kernels serves it on the fused shape (input K, the members' summed outputs N)."""
    if not all(fmt.fits(m.in_features) for m in members):
        return False
    if fmt.keep or target != "vllm":
        return True

    n = sum(m.out_features for m in members)
    return all(wna16_problem(fmt.bits, fmt.group, m.in_features, n) is None for m in members)


def target_palette(formats: Sequence[str], target: str) -> list[str]:
    """The formats of a palette a target can serve at some shape (all of them under "transformers")."""
    if target != "vllm":
        return list(formats)

    return [f for f in formats if parse_format(f).keep or format_problem(parse_format(f).bits,
                                                                         parse_format(f).group) is None]


# --- allocation (pure) -------------------------------------------------------------------------------------------

class BudgetAllocation(BaseModel):
    """What any allocation under a bits budget records (compressed-tensors formats here, GGUF types in gguf_mixed)."""

    budget_bits: float
    effective_bits: float = Field(description="bits per allocated weight, as allocated")
    predicted_bytes: int = Field(description="bytes of the allocated tensors in the saved file")
    sensitivity_total: float = Field(description="sum of the chosen formats' sensitivity scores (estimated KL)")
    counts: dict[str, int]


class Allocation(BudgetAllocation):
    """The per-layer formats chosen for a budget: stored in the step record, replayable as `layer_formats`."""

    layer_formats: dict[str, str]


#: knapsack resolution: the budget left above the cheapest choice (see `knapsack`) is cut into this many units; each
#: option's extra cost over its item's cheapest is rounded *up* to whole units, so the allocation always meets the
#: budget and gives away at most items x (budget - cheapest)/UNITS bytes
UNITS = 50_000
#: budgets (bits per weight) this close below the palette's minimum count as the minimum: validation
#: (`strategy._check_mixed`), `allocate` and `knapsack` (through `solve`) use this one tolerance, so a budget one of
#: them accepts the others do too. It absorbs float rounding of bits <-> bytes (1e-9 bits per weight is 1 byte at 8B
#: weights), not real bytes.
BITS_TOLERANCE = 1e-9


def below_minimum(budget_bits: float, min_bits: float) -> bool:
    """Whether a budget is below the smallest size the palette reaches (beyond `BITS_TOLERANCE`): the one rule of
    validation and allocation."""
    return budget_bits < min_bits - BITS_TOLERANCE


def _cheapest(costs: Sequence[Sequence[Optional[int]]]) -> list[int]:
    """Each item's cheapest offered cost; ValueError for an item offered nothing."""
    out = []
    for i, row in enumerate(costs):
        offered = [c for c in row if c is not None]
        if not offered:
            raise ValueError(f"no option offered for item {i}")
        out.append(min(offered))
    return out


def _extra_units(costs: Sequence[Sequence[Optional[int]]], base: Sequence[int], capacity: int,
                 size: int) -> list[list[Optional[int]]]:
    """Each option's cost above its item's cheapest in whole units of capacity/size bytes, rounded up, in integer
    arithmetic (so chosen units summing to at most `size` mean chosen bytes summing to at most `capacity`, with no
    float rounding); 0 stays 0, so the cheapest options fit a zero capacity. None where not offered or larger
    than the whole capacity."""
    out: list[list[Optional[int]]] = []
    for row, b in zip(costs, base):
        units: list[Optional[int]] = []
        for c in row:
            extra = None if c is None else math.ceil(c) - b
            if extra is None or extra > capacity:
                units.append(None)
            else:
                units.append(0 if extra == 0 else -(-extra * size // capacity))
        out.append(units)
    return out


def knapsack(costs: Sequence[Sequence[Optional[int]]], scores: Sequence[Sequence[float]],
             budget: float, slack: float = 0.0) -> tuple[list[int], float]:
    """Multiple-choice knapsack: one option per item (`costs[i][k]` bytes, None where option k is not offered for
    item i; `scores[i][k]` its damage), total bytes <= `budget`, summed damage minimal. Returns (option per item,
    summed damage). Shared by the compressed-tensors and the GGUF allocations. ValueError when no choice meets the
    budget.

    Exact at the minimum: every item's cheapest cost is paid first, in exact bytes, and the dynamic programme runs
    over the *extra* cost of each option above it, with the capacity left (budget - cheapest total, whole bytes)
    cut into at most `UNITS` units (whole bytes when it is smaller). Rounding the whole costs up to units of
    budget/UNITS, as before, made a budget at the palette's minimum infeasible (the rounded sum exceeded the
    capacity) although validation accepted it. A budget below the cheapest total by at most `slack` bytes (float
    rounding of a budget given in bits, see `BITS_TOLERANCE`) counts as that total: every item then takes a
    cheapest option."""
    n = len(costs)
    base = [math.ceil(b) for b in _cheapest(costs)]
    left = budget - sum(base)
    if left < -max(slack, 0.0):
        raise ValueError("no choice meets the budget")
    capacity = max(0, math.floor(left))
    size = min(UNITS, capacity)
    units = _extra_units(costs, base, capacity, size)
    dp = np.full(size + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((n, size + 1), dtype=np.int8)
    for i, row in enumerate(units):
        new = np.full(size + 1, np.inf)
        arg = np.zeros(size + 1, dtype=np.int8)
        for k, c in enumerate(row):
            if c is None or c > size:
                continue
            cand = np.full(size + 1, np.inf)
            cand[c:] = dp[:size + 1 - c] + float(scores[i][k])
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp, choice[i] = new, arg
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        raise ValueError("no choice meets the budget")
    picked = [0] * n
    j = end
    for i in range(n - 1, -1, -1):
        k = int(choice[i, j])
        picked[i] = k
        j -= units[i][k]   # type: ignore[operator]
    return picked, float(dp[end])


def allocate(layers: Sequence[LayerShape], sensitivity: dict[str, dict[str, float]], formats: Sequence[str],
             budget_bits: float, dense_bytes: int, target: str = "transformers",
             family: Optional[str] = None) -> Allocation:
    """Choose one format per item (`items`: a layer, or under target "vllm" a fused group whose members all take it)
    minimising the summed sensitivity with total bytes <= budget_bits/8 per weight (`knapsack`). An item's bytes and
    sensitivity per format are its members' sums (one format on q/k/v costs and hurts what the three do). Formats
    not `offered` to an item, or without a score for each member, are not offered. Raises ValueError when the
    budget is below the smallest size the palette can reach."""
    fmts = [parse_format(f) for f in formats]
    lo = min_effective_bits(layers, formats, dense_bytes, target, family)
    if below_minimum(budget_bits, lo):
        raise ValueError(f"budget {budget_bits:g} bits per weight is below the smallest the formats "
                         f"{', '.join(formats)} reach on this model ({lo:.3f})"
                         + (" with one format per fused layer (target vllm)" if target == "vllm" else ""))
    total_w = sum(l.numel for l in layers)
    groups = items(layers, target, family)
    costs, scores = [], []
    for members in groups:
        ok = [offered(f, members, target) and (f.keep or all(f.name in sensitivity.get(m.name, {}) for m in members))
              for f in fmts]
        costs.append([sum(layer_bytes(f, m.out_features, m.in_features, dense_bytes, m.name) for m in members)
                      if o else None for f, o in zip(fmts, ok)])
        scores.append([0.0 if (f.keep or not o) else sum(float(sensitivity[m.name][f.name]) for m in members)
                       for f, o in zip(fmts, ok)])
    try:
        picked, facts = solve([g[0].name for g in groups], [f.name for f in fmts], costs, scores, budget_bits,
                              total_w)
    except ValueError:
        raise ValueError(f"no allocation meets {budget_bits:g} bits per weight with formats "
                         f"{', '.join(formats)}") from None
    per_layer = {m.name: picked[g[0].name] for g in groups for m in g}
    counts: dict[str, int] = {}
    for f in per_layer.values():
        counts[f] = counts.get(f, 0) + 1
    facts["counts"] = counts
    return Allocation(layer_formats={l.name: per_layer[l.name] for l in layers}, **facts)


def solve(names: Sequence[str], options: Sequence[str], costs: Sequence[Sequence[Optional[int]]],
          scores: Sequence[Sequence[float]], budget_bits: float, weights: int) -> tuple[dict[str, str], dict]:
    """`knapsack` at `budget_bits` per weight over `weights` weights: (name -> chosen option, the fields every
    `BudgetAllocation` records). ValueError when nothing meets the budget. A budget within `BITS_TOLERANCE` below the
    cheapest choice takes the cheapest choice (validation accepts it)."""
    ks, total = knapsack(costs, scores, budget_bits * weights / 8, slack=BITS_TOLERANCE * weights / 8)
    picked = {n: options[k] for n, k in zip(names, ks)}
    nbytes = sum(c[k] for c, k in zip(costs, ks))
    counts: dict[str, int] = {}
    for o in picked.values():
        counts[o] = counts.get(o, 0) + 1
    return picked, {"budget_bits": budget_bits, "effective_bits": round(8 * nbytes / weights, 4),
                    "predicted_bytes": nbytes, "sensitivity_total": total, "counts": counts}


def config_groups(layer_formats: dict[str, str]) -> tuple[dict, list[str]]:
    """llm-compressor `config_groups` (one group per format, exact layer names as targets) and the layers kept."""
    groups: dict[str, dict] = {}
    keep: list[str] = []
    for name, f in layer_formats.items():
        fmt = parse_format(f)
        if fmt.keep:
            keep.append(name)
            continue
        groups.setdefault(f, {"targets": [], "weights": fmt.weights_args()})["targets"].append(name)
    return groups, keep


# --- sensitivity (needs the model) -------------------------------------------------------------------------------

def rtn(weight, fmt: Format):
    """Round-to-nearest fake quantization as compressed-tensors' symmetric min-max observer does it: scale =
    max|w| / ((qmax - qmin) / 2) per group, values clamped to [qmin, qmax]. Written here because only the error
    dW = RTN(W) - W is needed, for every layer and format, without building quantized modules."""
    import torch

    if fmt.keep:
        return weight
    out, inn = weight.shape
    g = fmt.group or inn
    w = weight.detach().float().reshape(out, inn // g, g)
    qmax, qmin = 2 ** (fmt.bits - 1) - 1, -(2 ** (fmt.bits - 1))
    scale = (w.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(w / scale), qmin, qmax)
    return (q * scale).reshape(out, inn)


def linear_layers(model, ignore: Iterable[str] = ("lm_head",)) -> list[tuple[str, object]]:
    """The model's Linear layers the allocator may assign formats to (lm_head and ignored names excluded)."""
    import torch

    ign = tuple(ignore)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(n == i or n.endswith("." + i) or n.endswith(i) for i in ign)]


def shapes_of(model, ignore: Iterable[str] = ("lm_head",)) -> list[LayerShape]:
    return [LayerShape(name=n, out_features=m.out_features, in_features=m.in_features)
            for n, m in linear_layers(model, ignore)]


def fisher_diagonal(model, ids, params: dict[str, object], *, seed: int = 0,
                    progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict[str, object], int]:
    """Diagonal Fisher of the model's own next-token distribution for each named parameter in `params` (name ->
    torch Parameter), summed over the tokens of `ids` (n windows x L): squared gradients of the log-likelihood of
    tokens sampled from the model, one window per backward so they are per window (a batch would square the sum of
    its windows' gradients). Returns (name -> float32 tensor, tokens). A tied embedding is one parameter: its
    gradient, hence its Fisher, adds the input-lookup and output-projection uses, as the one stored table needs."""
    import torch

    all_params = [p for p in model.parameters()]
    was = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}

    def squared_into(n: str):
        # each gradient is squared into its float32 sum as soon as backward has it, then dropped: gradients of the
        # whole model never exist at once (at Llama-3.1-8B shape that is 14 GB of bf16 the pass no longer holds)
        def hook(p) -> None:
            fisher[n].add_(p.grad.float().square_())
            p.grad = None
        return hook

    hooks = [p.register_post_accumulate_grad_hook(squared_into(n)) for n, p in params.items()]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = next(model.parameters()).device
    tokens = 0
    model.eval()
    try:
        for i in range(ids.shape[0]):
            row = ids[i:i + 1].to(dev)
            logits = model(input_ids=row).logits[0, :-1].float()
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=gen).squeeze(-1).to(dev)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
            tokens += logits.shape[0]
            if progress:
                progress(i + 1, ids.shape[0])
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        for p, w in zip(all_params, was):
            p.requires_grad_(w)
    return fisher, tokens


def fisher_sensitivity(model, ids, formats: Sequence[str], ignore: Iterable[str] = ("lm_head",), *, seed: int = 0,
                       progress: Optional[Callable[[int, int], None]] = None) -> dict[str, dict[str, float]]:
    """Estimated KL increase per (layer, format): 1/2 sum_i F_ii dW_i^2 / tokens, F the diagonal Fisher
    (`fisher_diagonal`) and dW the RTN error of the format."""
    import torch

    layers = linear_layers(model, ignore)
    fisher, tokens = fisher_diagonal(model, ids, {n: m.weight for n, m in layers}, seed=seed, progress=progress)
    fmts = [parse_format(f) for f in formats if f != KEEP]
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for n, m in layers:
            w = m.weight.detach().float()
            out[n] = {f.name: float(0.5 * (fisher[n] * (rtn(w, f) - w) ** 2).sum() / max(1, tokens))
                      for f in fmts if f.fits(m.in_features)}
    return out


def direct_sensitivity(model, ids, layer_names: Sequence[str], fmt: Format, *, batch: int = 4) -> dict[str, float]:
    """Measured KL increase (mean per token, KL(baseline || model)) when only one layer is RTN-quantized, for each
    layer in turn: the ground truth the Fisher estimate is checked against (cost: one forward per layer)."""
    import torch

    mods = dict(model.named_modules())
    dev = next(model.parameters()).device

    def logp_all():
        outs = []
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                outs.append(torch.log_softmax(model(input_ids=ids[i:i + batch].to(dev)).logits[:, :-1].float(), -1))
        return outs

    ref = logp_all()
    out: dict[str, float] = {}
    for n in layer_names:
        w = mods[n].weight
        keep = w.detach().clone()
        with torch.no_grad():
            w.copy_(rtn(keep, fmt).to(w.dtype))
        try:
            got = logp_all()
            kl = sum(float((r.exp() * (r - q)).sum(-1).sum()) for r, q in zip(ref, got))
            out[n] = kl / sum(r.shape[0] * r.shape[1] for r in ref)
        finally:
            with torch.no_grad():
                w.copy_(keep)
    return out
