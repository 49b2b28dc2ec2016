"""Pure multi-objective functions: dominance with per-objective directions, frontier, hypervolume, crowding.

Points are dicts {objective: value}. Internally everything is turned into minimisation (maximised objectives
are negated), which is the convention Optuna's hypervolume code uses too.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from acf.core.objectives import DIRECTIONS

Point = Mapping[str, float]


def _as_min(p: Point, objectives: Sequence[str], directions: Mapping[str, str] = DIRECTIONS) -> np.ndarray:
    return np.array([(-p[o] if directions[o] == "maximize" else p[o]) for o in objectives], dtype=float)


def dominates(a: Point, b: Point, objectives: Sequence[str], directions: Mapping[str, str] = DIRECTIONS) -> bool:
    """a dominates b: no worse in every objective and strictly better in at least one."""
    x, y = _as_min(a, objectives, directions), _as_min(b, objectives, directions)
    return bool(np.all(x <= y) and np.any(x < y))


def pareto_front(points: Mapping[str, Point], objectives: Sequence[str],
                 directions: Mapping[str, str] = DIRECTIONS) -> list[str]:
    """Ids of the non-dominated points (points with a missing or non-finite objective are excluded)."""
    ok = {k: p for k, p in points.items()
          if all(o in p and p[o] is not None and math.isfinite(p[o]) for o in objectives)}
    front = []
    for k, p in ok.items():
        if not any(dominates(q, p, objectives, directions) for j, q in ok.items() if j != k):
            front.append(k)
    # Exact duplicates dominate nobody: keep only the first of each identical vector.
    seen, out = set(), []
    for k in front:
        key = tuple(_as_min(ok[k], objectives, directions))
        if key not in seen:
            seen.add(key)
            out.append(k)
    return out


def reference_point(baseline: Point, objectives: Sequence[str], directions: Mapping[str, str] = DIRECTIONS,
                    slack: float = 0.1, fixed: Mapping[str, float] | None = None) -> dict[str, float]:
    """Reference point derived from the baseline: each objective `slack` worse than the baseline.

    Cost objectives (size, latency, memory) use the baseline itself plus slack, so a candidate only adds volume
    when it is no more than 10% worse than the uncompressed model; quality objectives likewise. `fixed` sets an
    objective's reference directly: kld is 0 for the baseline, so its reference is the --max-kld bound.
    """
    ref = {}
    for o in objectives:
        if fixed and fixed.get(o) is not None:
            ref[o] = float(fixed[o])
            continue
        v = float(baseline[o])
        worse = abs(v) * slack if v != 0 else slack
        ref[o] = v - worse if directions[o] == "maximize" else v + worse
    return ref


def hypervolume(points: Sequence[Point], objectives: Sequence[str], ref: Mapping[str, float],
                directions: Mapping[str, str] = DIRECTIONS, normalise: Mapping[str, float] | None = None) -> float:
    """Hypervolume dominated by `points` up to `ref` (Optuna's WFG implementation).

    Each objective is divided by `normalise[o]` (the baseline magnitude by default), so objectives in bytes and
    in nats contribute on comparable scales and the volume is unit-free.
    """
    from optuna._hypervolume import compute_hypervolume  # WFG algorithm; Optuna's own, used by its samplers

    if not points:
        return 0.0
    scale = np.array([abs(normalise[o]) if normalise and normalise.get(o) else 1.0 for o in objectives])
    r = _as_min(ref, objectives, directions) / scale
    pts = []
    for p in points:
        if not all(o in p and p[o] is not None and math.isfinite(p[o]) for o in objectives):
            continue
        x = _as_min(p, objectives, directions) / scale
        if np.all(x < r):
            pts.append(x)
    if not pts:
        return 0.0
    return float(compute_hypervolume(np.array(pts), r, assume_pareto=False))


def frontier_stalled(recorded: Sequence[str], frontier: Sequence[str], k: int) -> bool:
    """True when none of the last `k` recorded candidates (in recording order) is on the frontier now: the frontier
    has gained no member in `k` episodes. A candidate of that window that joined and was pushed off again was pushed
    off by a later one, which is then on the frontier, so membership of the window is enough to tell.

    Why not the hypervolume: a candidate outside the reference box (e.g. a W4 model that transformers dequantizes
    on a CPU, slower than the baseline) joins the frontier without adding volume, so a flat hypervolume stopped
    runs whose frontier was still improving on kld and size."""
    if k < 1 or len(recorded) <= k:
        return False
    members = set(frontier)
    return not any(c in members for c in recorded[-k:])


def crowding_distance(points: Mapping[str, Point], objectives: Sequence[str]) -> dict[str, float]:
    """NSGA-II crowding distance within one front (boundary points get infinity)."""
    ids = list(points)
    dist = {k: 0.0 for k in ids}
    if len(ids) <= 2:
        return {k: math.inf for k in ids}
    for o in objectives:
        order = sorted(ids, key=lambda k: points[k][o])
        lo, hi = points[order[0]][o], points[order[-1]][o]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for i in range(1, len(order) - 1):
            dist[order[i]] += (points[order[i + 1]][o] - points[order[i - 1]][o]) / (hi - lo)
    return dist
