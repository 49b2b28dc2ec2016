"""The budget knapsack (acf.methods.mixed.knapsack) at and near the palette's minimum: the smallest budget that
validates must allocate (issue #27), and every allocation stays within its budget. Pure, except the tests that read
a real model's shapes (its config only, no weights)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from acf.core.errors import StrategyError
from acf.methods.mixed import (BITS_TOLERANCE, KEEP, UNITS, LayerShape, allocate, effective_bits, knapsack,
                               layer_bytes, min_effective_bits, parse_format)

SHAPES = [LayerShape(name=f"l{i}", out_features=o, in_features=w)
          for i, (o, w) in enumerate([(64, 64), (128, 64), (64, 128), (32, 64), (64, 64), (96, 32)])]
FORMATS = ["w3g32", "w4g32", "w4", "w8", KEEP]


def _sens(shapes: list[LayerShape], formats: list[str], seed: int = 0) -> dict[str, dict[str, float]]:
    """Scores that fall with bits (so the cheapest format is never free), random per layer."""
    rng = random.Random(seed)
    out = {}
    for l in shapes:
        base = rng.random() + 0.01
        out[l.name] = {f: base * 2.0 ** (8 - parse_format(f).bits) * (1.1 if parse_format(f).group is None else 1.0)
                       for f in formats if f != KEEP and parse_format(f).fits(l.in_features)}
    return out


def _cheapest_bytes(l: LayerShape, formats: list[str], dense: int) -> int:
    return min(layer_bytes(parse_format(f), l.out_features, l.in_features, dense, l.name)
               for f in formats if parse_format(f).fits(l.in_features))


def _assert_all_cheapest(shapes, formats, alloc, dense) -> None:
    for l in shapes:
        got = layer_bytes(parse_format(alloc.layer_formats[l.name]), l.out_features, l.in_features, dense, l.name)
        assert got == _cheapest_bytes(l, formats, dense), l.name


def _predicted_bytes(shapes, layer_formats, dense) -> int:
    by = {l.name: l for l in shapes}
    return sum(layer_bytes(parse_format(f), by[n].out_features, by[n].in_features, dense, n)
               for n, f in layer_formats.items())


def test_budget_at_the_minimum_allocates_every_layer_at_its_cheapest_format():
    lo = min_effective_bits(SHAPES, FORMATS, 2)
    a = allocate(SHAPES, _sens(SHAPES, FORMATS), FORMATS, lo, dense_bytes=2)
    _assert_all_cheapest(SHAPES, FORMATS, a, 2)
    assert a.predicted_bytes == _predicted_bytes(SHAPES, a.layer_formats, 2)
    assert a.effective_bits == pytest.approx(lo, abs=1e-4)


@pytest.mark.parametrize("above", [1e-7, 1e-4, 0.01, 0.3])
def test_budget_just_above_the_minimum_allocates_within_budget(above):
    lo = min_effective_bits(SHAPES, FORMATS, 2)
    budget = lo + above
    a = allocate(SHAPES, _sens(SHAPES, FORMATS), FORMATS, budget, dense_bytes=2)
    weights = sum(l.numel for l in SHAPES)
    assert a.predicted_bytes <= budget * weights / 8
    assert effective_bits(SHAPES, a.layer_formats, 2) <= budget


def test_budget_below_the_minimum_is_refused_at_the_tolerance():
    lo = min_effective_bits(SHAPES, FORMATS, 2)
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(SHAPES, _sens(SHAPES, FORMATS), FORMATS, lo - 10 * BITS_TOLERANCE, dense_bytes=2)
    # within the tolerance (float rounding of bits <-> bytes) the minimum is what is allocated
    a = allocate(SHAPES, _sens(SHAPES, FORMATS), FORMATS, lo - BITS_TOLERANCE / 2, dense_bytes=2)
    _assert_all_cheapest(SHAPES, FORMATS, a, 2)


def test_zero_capacity_takes_the_cheapest_option_of_each_item():
    costs = [[100, 50, None], [70, 70, 90], [10, 30, 20]]
    scores = [[1.0, 5.0, 0.0], [2.0, 1.0, 0.0], [3.0, 1.0, 2.0]]
    picked, total = knapsack(costs, scores, 50 + 70 + 10)
    assert picked == [1, 1, 0] and total == 5.0 + 1.0 + 3.0    # the tie at 70 bytes goes to the lower score
    with pytest.raises(ValueError):
        knapsack(costs, scores, 50 + 70 + 10 - 1)
    assert knapsack(costs, scores, 129.5, slack=1.0)[0] == [1, 1, 0]
    with pytest.raises(ValueError):
        knapsack([[None, None]], [[0.0, 0.0]], 1e9)


def _brute(costs, scores, budget: float) -> float:
    best = math.inf
    for combo in itertools.product(*[range(len(r)) for r in costs]):
        if any(costs[i][k] is None for i, k in enumerate(combo)):
            continue
        if sum(costs[i][k] for i, k in enumerate(combo)) <= budget:
            best = min(best, sum(scores[i][k] for i, k in enumerate(combo)))
    return best


@pytest.mark.parametrize("scale", [1, 10_000])
def test_random_small_instances_against_brute_force(scale):
    """Small costs: the capacity is below UNITS, the knapsack works in whole bytes and is exact. Large costs: the
    capacity is cut into UNITS units and each extra cost rounds up by less than one unit, so the result is at least as
    good as the true optimum of a budget smaller by n units, and never better than the optimum at the budget."""
    rng = random.Random(1234 + scale)
    for _ in range(200):
        n = rng.randint(1, 5)
        costs = [[None if rng.random() < 0.15 else rng.randint(1, 1000) * scale for _ in range(3)] for _ in range(n)]
        for row in costs:
            if all(c is None for c in row):
                row[rng.randrange(3)] = rng.randint(1, 1000) * scale
        scores = [[round(rng.random(), 3) for _ in range(3)] for _ in range(n)]
        lo = sum(min(c for c in row if c is not None) for row in costs)
        hi = sum(max(c for c in row if c is not None) for row in costs)
        budget = rng.choice([lo, lo + rng.random() * (hi - lo), hi, hi * 2, lo + 0.5])
        picked, total = knapsack(costs, scores, budget)
        spent = sum(costs[i][k] for i, k in enumerate(picked))
        assert spent <= budget
        assert total == pytest.approx(sum(scores[i][k] for i, k in enumerate(picked)))
        best = _brute(costs, scores, budget)
        unit = max(1.0, math.floor(budget - lo) / UNITS)
        assert best - 1e-9 <= total <= _brute(costs, scores, budget - n * unit) + 1e-9
        if scale == 1:
            assert total == pytest.approx(best)
        with pytest.raises(ValueError):
            knapsack(costs, scores, lo - 1)


# --- on real shapes: validation and allocation agree --------------------------------------------------------------

def _shapes_and_palette(spec, ignore=("lm_head",), target="vllm"):
    from acf.methods.mixed_step import palette

    shapes = [LayerShape(name=l.name, out_features=l.out_features, in_features=l.in_features) for l in spec.linears
              if not any(l.name == i or l.name.endswith("." + i) or l.name.endswith(i) for i in ignore)]
    return shapes, palette({"target": target}, shapes)


@pytest.mark.parametrize("target,floor", [("transformers", 3.25614), ("vllm", 4.02958)])
def test_smallest_budget_that_validates_allocates_on_the_default_model(smol_dir, target, floor):
    """Issue #27: uniform W3 g64's size (3.25614 bits per weight on the default model) validated but the knapsack
    refused it, since rounding every whole cost up to budget/UNITS overshot the capacity at the minimum. Under
    target vllm (no 3-bit format, one format per fused layer) the floor is uniform W4 per channel's, 4.02958."""
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec

    spec = infer_spec(smol_dir)
    shapes, formats = _shapes_and_palette(spec, target=target)
    dense = spec.bytes_per_param
    lo = min_effective_bits(shapes, formats, dense, target, spec.family)
    assert round(lo, 5) == floor
    sens = _sens(shapes, formats, seed=3)
    for budget in (lo, lo - BITS_TOLERANCE / 2, lo + 1e-6, lo + 1e-3):
        validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": budget, "target": target}}]}, spec)
        a = allocate(shapes, sens, formats, budget, dense, target, spec.family)
        assert a.predicted_bytes <= budget * sum(l.numel for l in shapes) / 8 + 1
    _assert_all_cheapest(shapes, formats, allocate(shapes, sens, formats, lo, dense, target, spec.family), dense)
    below = lo - 10 * BITS_TOLERANCE
    with pytest.raises(StrategyError, match="below the smallest"):
        validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": below, "target": target}}]}, spec)
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(shapes, sens, formats, below, dense, target, spec.family)
