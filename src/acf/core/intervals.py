"""Confidence intervals of proportions and means: small statistics every task metric uses (tasks and evaluation)."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); well-behaved at 0 and n."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = 1.959964) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean of values in [0, 1] (e.g. TruthfulQA MC2 mass), clipped."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    m = sum(values) / n
    if n == 1:
        return (0.0, 1.0)
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, m - half), min(1.0, m + half))
