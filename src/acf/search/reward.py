"""Pure reward: a weighted sum of baseline-normalised objectives with constraint penalties, and presets.

Normalisation makes objectives in bytes, ms and nats comparable:
- quality to maximise (accuracy, mc1, ...): retention = value / baseline
- answer NLL: retention = exp(baseline - value), the ratio of per-token likelihoods (1.0 = no loss)
- kld, kld_general (nats/token, baseline 0): exp(-value), the same scale (1.0 = identical distributions)
- costs to minimise (size, latency, memory, ...): saving = 1 - value / baseline (0.5 = halved)
- throughput: gain = value / baseline - 1
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from pydantic import BaseModel

from acf.core.metrics import TABLE
from acf.core.objectives import FIDELITY, QUALITY

# Preset: share of weight on quality, and relative weights among cost objectives (a cost not named weighs 1).
PRESETS: dict[str, dict] = {
    "accuracy_focused": {"quality": 0.75, "costs": {}},
    "balanced": {"quality": 0.5, "costs": {}},
    "latency_focused": {"quality": 0.4, "costs": {"latency": 4, "ttft": 2, "throughput": 2}},
    "memory_constrained": {"quality": 0.4, "costs": {"memory": 3, "size": 3, "bits_per_weight": 2}},
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
    """The metric table's normalisation of `name` (acf.core.metrics.Metric.normalise)."""
    how = TABLE[name].normalise
    if how == "exp_diff":
        return math.exp(baseline - value)
    if how == "exp_neg":
        return math.exp(-max(value, 0.0))
    if how == "ratio":
        return value / baseline if baseline else (1.0 if value == 0 else 1.0 + value)
    if how == "gain":
        return value / baseline - 1 if baseline else 0.0
    return 1 - value / baseline if baseline else 0.0


def weights_for(objectives: Sequence[str], preset: str) -> dict[str, float]:
    if preset not in PRESETS:
        from acf.core.errors import AcfError

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
    """Task-quality retention on the first task quality objective (what --min-retention constrains); None when the
    objectives hold only fidelity metrics (kld is constrained by --max-kld instead)."""
    for o in objectives:
        if o in QUALITY and o not in FIDELITY and values.get(o) is not None and baseline.get(o) is not None:
            return normalised_score(o, values[o], baseline[o])
    return None


def reward(values: Mapping[str, float], baseline: Mapping[str, float], objectives: Sequence[str],
           preset: str = "balanced", min_retention: Optional[float] = None, max_kld: Optional[float] = None,
           kld: Optional[float] = None) -> RewardResult:
    """`kld` is the candidate's measured kld when it is not among the objectives (the --max-kld constraint holds
    whenever kld was measured)."""
    w = weights_for(objectives, preset)
    norm = {o: normalised_score(o, values[o], baseline[o]) for o in objectives}
    terms = {o: w[o] * norm[o] for o in objectives}
    ret = retention(values, baseline, objectives)
    pen = 0.0
    if min_retention is not None and ret is not None and ret < min_retention:
        pen = PENALTY * (min_retention - ret)
    k = values.get("kld", kld)
    if max_kld is not None and k is not None and k > max_kld:
        pen += PENALTY * (k - max_kld)
    total = sum(terms.values()) - pen
    return RewardResult(reward=total, terms=terms, normalised=norm, weights=w, retention=ret, feasible=pen == 0.0,
                        penalty=pen)


def recommend(candidates: Mapping[str, Mapping[str, float]], frontier: Sequence[str], baseline: Mapping[str, float],
              objectives: Sequence[str], preset: str, min_retention: Optional[float], max_kld: Optional[float] = None,
              klds: Optional[Mapping[str, Optional[float]]] = None) -> Optional[tuple[str, RewardResult]]:
    """The frontier member with the highest reward, preferring feasible ones (constraints met)."""
    klds = klds or {}
    scored = [(cid, reward(candidates[cid], baseline, objectives, preset, min_retention, max_kld, klds.get(cid)))
              for cid in frontier]
    if not scored:
        return None
    scored.sort(key=lambda x: (x[1].feasible, x[1].reward), reverse=True)
    return scored[0]
