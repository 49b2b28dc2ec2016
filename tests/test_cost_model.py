"""The step-time estimates (acf.methods.registry.estimate_step_seconds: approval, --dry-run, preflight) against the
step times the committed runs recorded: most within 3x, and no method's median off by 10x. Reads JSON only."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_estimates_are_near_the_recorded_step_times():
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_cost_model import RESULTS, step_rows, summarise

    rows = [r for f in sorted(RESULTS.glob("*/frontier.json")) for r in step_rows(f)]
    assert len(rows) >= 100
    within = sum(1 for r in rows if 1 / 3 <= r["measured"] / r["estimated"] <= 3) / len(rows)
    assert within >= 0.8
    # methods that take real time (the data-free ones take seconds either way)
    for t in summarise(rows):
        if t["method"] in ("gptq", "awq", "autoround", "kd_tune", "lora", "distill", "sparsegpt", "w8a8", "gguf"):
            assert 0.1 <= t["median_ratio"] <= 10, t
