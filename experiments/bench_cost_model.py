#!/usr/bin/env python3
"""How far the registry's step-time estimates (acf.methods.registry.estimate_step_seconds, shown at approval, by
`--dry-run` and by preflight) are from the step times real runs recorded.

Reads every committed run's frontier.json under experiments/results (recipes, candidates and controls: each step
records its measured `wall_seconds`, device and params), recomputes the estimate for the same step, params, model size
and device, and prints, per method and device, n steps and the median and range of measured / estimated. No model is
loaded; nothing is run. Writes experiments/results/cost-model.{json,md}.

    python experiments/bench_cost_model.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).parent / "results"


def step_rows(frontier: Path) -> list[dict]:
    """(method, device, measured, estimated) of every ok step with a wall time in one run's frontier file."""
    from acf.methods.registry import estimate_step_seconds

    ff = json.loads(frontier.read_text())
    n_params = int(ff.get("spec", {}).get("params") or 0)
    if not n_params:
        return []
    rows = []
    for c in ff.get("recipes", []) + ff.get("candidates", []) + ff.get("controls", []):
        for s in c.get("steps") or []:
            if s.get("status") != "ok" or not s.get("wall_seconds"):
                continue
            device = s.get("device") or ff["run"]["device"]
            est = estimate_step_seconds(s["method"], s["params"], n_params, device)
            rows.append({"run": frontier.parent.name, "id": c["id"], "method": s["method"],
                         "device": "cuda" if str(device).startswith("cuda") else "cpu",
                         "measured": float(s["wall_seconds"]), "estimated": est})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["device"]), []).append(r["measured"] / r["estimated"])
    return [{"method": m, "device": d, "n": len(v), "median_ratio": round(statistics.median(v), 3),
             "min_ratio": round(min(v), 3), "max_ratio": round(max(v), 3)}
            for (m, d), v in sorted(groups.items())]


def main() -> None:
    rows = [r for f in sorted(RESULTS.glob("*/frontier.json")) for r in step_rows(f)]
    table = summarise(rows)
    lines = ["# Step-time estimates vs recorded step times",
             "",
             "measured / estimated per step (wall seconds of the step, load and save included), from every committed",
             "run's frontier.json; the estimate is recomputed with the current registry cost model. 1.0 = exact;",
             "< 1: the estimate is too high. Devices: `cpu` = the 2-core development machine, `cuda` = H100/H200.",
             "",
             "| method | device | n | median | min | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t['device']} | {t['n']} | {t['median_ratio']} | {t['min_ratio']} | "
              f"{t['max_ratio']} |" for t in table]
    ratios = [r["measured"] / r["estimated"] for r in rows]
    if ratios:
        within = sum(1 for x in ratios if 1 / 3 <= x <= 3) / len(ratios)
        lines += ["", f"{len(rows)} steps; {within:.0%} within 3x of the estimate."]
    print("\n".join(lines))
    (RESULTS / "cost-model.json").write_text(json.dumps({"table": table, "steps": rows}, indent=1) + "\n")
    (RESULTS / "cost-model.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
