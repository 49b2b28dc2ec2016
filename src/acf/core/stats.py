"""Paired comparisons of two models measured on the same items: the ratio of their token-weighted means, with a
bootstrap interval that resamples items (not tokens: the tokens of one item are not independent).

Why paired: two candidates scored on the same held-out items share each item's difficulty, so the interval of their
ratio is much narrower than one built from two independent intervals; the claim "acf's model has 0.5x the recipe's
damage" needs exactly that interval. Written by hand because it is ten lines of numpy over per-item sums that the
evaluator already keeps (`Measurement.extra["per_item"]`); scipy's `bootstrap` would add a dependency for the same.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

#: bootstrap resamples of the paired ratio interval
RESAMPLES = 2000
#: per-item sums are stored with this many significant digits (enough for a ratio to 4 places, small JSON)
DIGITS = 6


def items_digest(ids: Sequence[str]) -> str:
    """A short fingerprint of an ordered item list: two measurements pair only when their items are the same."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def per_item(ids: Sequence[str], sums: Sequence[float], tokens: Sequence[int]) -> dict:
    """What a Measurement keeps of its items for later paired comparisons (`extra["per_item"]`)."""
    return {"digest": items_digest(ids), "sums": [float(f"{s:.{DIGITS}g}") for s in sums],
            "tokens": [int(t) for t in tokens]}


def paired_ratio(a: Optional[dict], b: Optional[dict], *, resamples: int = RESAMPLES,
                 seed: int = 0) -> Optional[tuple[float, tuple[float, float]]]:
    """(ratio of a's token-weighted mean to b's, 95% percentile-bootstrap interval over items), from two
    `per_item` records of the same items; None when either is missing, they cover different items, or b is 0."""
    if not a or not b or a.get("digest") != b.get("digest") or len(a["sums"]) != len(b["sums"]) or not a["sums"]:
        return None
    sa, sb = np.asarray(a["sums"], float), np.asarray(b["sums"], float)
    ta, tb = np.asarray(a["tokens"], float), np.asarray(b["tokens"], float)

    def ratio(idx) -> np.ndarray:
        num = sa[idx].sum(-1) / np.maximum(ta[idx].sum(-1), 1)
        den = sb[idx].sum(-1) / np.maximum(tb[idx].sum(-1), 1)
        return num / np.where(den > 0, den, np.nan)

    full = float(ratio(np.arange(len(sa))))
    if not np.isfinite(full):
        return None
    rng = np.random.default_rng(seed)
    draws = ratio(rng.integers(0, len(sa), size=(resamples, len(sa))))
    draws = draws[np.isfinite(draws)]
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws.size else (np.nan, np.nan)
    return full, (float(lo), float(hi))
