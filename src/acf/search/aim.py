"""Where the next episode should aim: the size at which acf's frontier is weakest against the recipe frontier.

At each size of the recipe frontier (the best fixed recipe at that size, FrontierFile.recipe_frontier), the gap is
acf's best kld at no larger size over the recipe's (infinite where acf has nothing that small yet). The aim is the
largest gap; an aimed proposal fixes the precision budget whose predicted size is that recipe's (acf.search.
surrogate) and a quantizer that takes a budget, and lets the sampler choose the rest (act-order, kd_tune...). Pure functions over the
frontier file: the coordinator enqueues the aim (acf.coordinator.screening), the planner's prompt shows it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel

#: every AIM_FREE-th episode after the seeds is left to the sampler unaimed (pruning, depth drops and LoRA stay
#: explored); the others aim
AIM_FREE = 3


class Gap(BaseModel):
    """acf against the best fixed recipe at one recipe-frontier size (kld ratio; inf: acf has nothing that small)."""

    size: float
    recipe_id: str
    recipe_kld: float
    acf_id: Optional[str] = None
    acf_kld: Optional[float] = None
    ratio: float

    def describe(self) -> str:
        mib = self.size / 2**20
        if self.acf_id is None:
            return f"{mib:.1f} MiB ({self.recipe_id}, kld {self.recipe_kld:.4f}): acf has no candidate this small"
        return (f"{mib:.1f} MiB ({self.recipe_id}, kld {self.recipe_kld:.4f}): acf's best {self.acf_id} at "
                f"{self.ratio:.2f}x its kld")


def gaps(ff: Any, metric: str = "kld") -> list[Gap]:
    """The gap at each recipe-frontier size, smallest size first."""
    out = []
    for r in ff.recipe_frontier(metric):
        size, rk = float(r.metrics["size"].value), float(r.metrics[metric].value)
        best = ff.best_candidate_at(size, metric)
        if best is None:
            out.append(Gap(size=size, recipe_id=r.id, recipe_kld=rk, ratio=math.inf))
        else:
            ak = float(best.metrics[metric].value)
            out.append(Gap(size=size, recipe_id=r.id, recipe_kld=rk, acf_id=best.id, acf_kld=ak,
                           ratio=ak / rk if rk > 0 else (math.inf if ak > 0 else 1.0)))
    return out


def target(ff: Any, metric: str = "kld", exclude: tuple[float, ...] = ()) -> Optional[Gap]:
    """The largest gap (ties: the smaller size), skipping sizes in `exclude` (those the space cannot reach)."""
    cands = [g for g in gaps(ff, metric) if not any(abs(g.size - x) < 1 for x in exclude)]
    if not cands:
        return None
    return max(cands, key=lambda g: (g.ratio, -g.size))


def aims_this_episode(episode: int, seeds_left: bool) -> bool:
    """Whether the next sampled proposal is aimed: not while seeds remain, and not every AIM_FREE-th episode."""
    return not seeds_left and episode % AIM_FREE != 0
