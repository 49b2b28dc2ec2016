"""Pure reward: a weighted sum of baseline-normalised objectives with constraint penalties, and presets.

Normalisation makes objectives in bytes, ms and nats comparable:
- quality to maximise (accuracy, mc1, ...): retention = value / baseline
- answer NLL: retention = exp(baseline - value), the ratio of per-token likelihoods (1.0 = no loss)
- costs to minimise (size, latency, memory, ...): saving = 1 - value / baseline (0.5 = halved)
- throughput: gain = value / baseline - 1
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from pydantic import BaseModel

from .objectives import DIRECTIONS, QUALITY

# Preset: share of weight on quality, and relative weights among cost objectives.
PRESETS: dict[str, dict] = {
    "accuracy_focused": {"quality": 0.75, "costs": {"size": 1, "memory": 1, "latency": 1, "ttft": 1, "throughput": 1,
                                                    "params": 1, "bits_per_weight": 1}},
    "balanced": {"quality": 0.5, "costs": {"size": 1, "memory": 1, "latency": 1, "ttft": 1, "throughput": 1,
                                           "params": 1, "bits_per_weight": 1}},
    "latency_focused": {"quality": 0.4, "costs": {"latency": 4, "ttft": 2, "throughput": 2, "size": 1, "memory": 1,
                                                  "params": 1, "bits_per_weight": 1}},
    "memory_constrained": {"quality": 0.4, "costs": {"memory": 3, "size": 3, "bits_per_weight": 2, "params": 1,
                                                     "latency": 1, "ttft": 1, "throughput": 1}},
}
PENALTY = 10.0


class RewardResult(BaseModel):
    reward: float
    terms: dict[str, float]          # weighted contribution of each objective
    normalised: dict[str, float]     # retention / saving per objective
    weights: dict[str, float]
    retention: Optional[float]
    feasible: bool
    penalty: float


def normalised_score(name: str, value: float, baseline: float) -> float:
    if name == "answer_nll":
        return math.exp(baseline - value)
    if name in QUALITY:
        return value / baseline if baseline else (1.0 if value == 0 else 1.0 + value)
    if DIRECTIONS[name] == "maximize":
        return value / baseline - 1 if baseline else 0.0
    return 1 - value / baseline if baseline else 0.0


def weights_for(objectives: Sequence[str], preset: str) -> dict[str, float]:
    if preset not in PRESETS:
        from .errors import AcfError

        raise AcfError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")
    p = PRESETS[preset]
    q = [o for o in objectives if o in QUALITY]
    c = [o for o in objectives if o not in QUALITY]
    w: dict[str, float] = {}
    q_share = p["quality"] if c else 1.0
    for o in q:
        w[o] = q_share / len(q)
    if c:
        tot = sum(p["costs"].get(o, 1) for o in c)
        for o in c:
            w[o] = (1 - q_share) * p["costs"].get(o, 1) / tot
    return w


def retention(values: Mapping[str, float], baseline: Mapping[str, float], objectives: Sequence[str]) -> Optional[float]:
    """Quality retention on the first quality objective (what --min-retention constrains)."""
    for o in objectives:
        if o in QUALITY and values.get(o) is not None and baseline.get(o) is not None:
            return normalised_score(o, values[o], baseline[o])
    return None


def reward(values: Mapping[str, float], baseline: Mapping[str, float], objectives: Sequence[str],
           preset: str = "balanced", min_retention: Optional[float] = None) -> RewardResult:
    w = weights_for(objectives, preset)
    norm = {o: normalised_score(o, values[o], baseline[o]) for o in objectives}
    terms = {o: w[o] * norm[o] for o in objectives}
    ret = retention(values, baseline, objectives)
    pen = 0.0
    if min_retention is not None and ret is not None and ret < min_retention:
        pen = PENALTY * (min_retention - ret)
    total = sum(terms.values()) - pen
    return RewardResult(reward=total, terms=terms, normalised=norm, weights=w, retention=ret, feasible=pen == 0.0,
                        penalty=pen)


def recommend(candidates: Mapping[str, Mapping[str, float]], frontier: Sequence[str], baseline: Mapping[str, float],
              objectives: Sequence[str], preset: str, min_retention: Optional[float]) -> Optional[tuple[str, RewardResult]]:
    """The frontier member with the highest reward, preferring feasible ones (constraint met)."""
    scored = [(cid, reward(candidates[cid], baseline, objectives, preset, min_retention)) for cid in frontier]
    if not scored:
        return None
    scored.sort(key=lambda x: (x[1].feasible, x[1].reward), reverse=True)
    return scored[0]
