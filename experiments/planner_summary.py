#!/usr/bin/env python3
"""Summarise a planner run against an Optuna-only run at the same settings (markdown on stdout).

Usage: planner_summary.py PLANNER_RUN_DIR OPTUNA_RUN_DIR
Reads frontier.json of both and planner_log.jsonl of the first; prints the proposals (valid / rejected with
reasons), every candidate, the frontiers and the final hypervolume (same reference: each run's own baseline,
which is the same model evaluated on the same items).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from acf.planner import read_planner_log  # noqa: E402
from acf.coordinator.state import load_frontier_file  # noqa: E402


def _v(name: str, v) -> str:
    if v is None:
        return "-"
    if name == "size":
        return f"{v / 2**20:.1f} MiB"
    if name in ("latency", "ttft"):
        return f"{v:.1f} ms"
    return f"{v:.4f}"


def candidates_table(run: Path) -> list[str]:
    ff = load_frontier_file(run / "frontier.json")
    objs = ff.run.objectives
    out = ["| id | proposed by | strategy | status | " + " | ".join(objs) + " | retention | on frontier |",
           "|---|---|---|---|" + "---|" * len(objs) + "---|---|"]
    for c in [ff.baseline] + ff.candidates:
        out.append(f"| {c.id} | {c.proposed_by} | {c.description} | {c.status} | "
                   + " | ".join(_v(o, c.objectives.get(o)) for o in objs)
                   + f" | {'-' if c.retention is None else f'{c.retention:.3f}'} | {'yes' if c.id in ff.frontier else ''} |")
    hv = ff.hypervolume[-1].hypervolume if ff.hypervolume else 0.0
    out += ["", f"frontier: {', '.join(ff.frontier)} · final hypervolume {hv:.4f} · recommended "
                f"{ff.recommended.id if ff.recommended else '-'} · wall {ff.run.wall_seconds:.0f} s"]
    return out


def main(planner_run: str, optuna_run: str) -> None:
    pr, orun = Path(planner_run), Path(optuna_run)
    log = read_planner_log(pr)
    acc = [r for r in log if r["status"] == "accepted"]
    rej = [r for r in log if r["status"] == "rejected"]
    print(f"## Planner proposals ({len(log)} turns: {len(acc)} valid, {len(rej)} rejected)\n")
    print("| episode | status | kind | reason / strategy | seconds |\n|---|---|---|---|---|")
    for r in log:
        if r["status"] == "accepted":
            what = " -> ".join(f"{s['method']}" for s in r["strategy"]["steps"]) + f" (trial {r['trial']}); " \
                   f"rationale: {r['rationale'][:160]}"
        else:
            what = r["reason"][:200]
        print(f"| {r['episode']} | {r['status']} | {r.get('kind', '')} | {what.replace('|', '/')} | {r['seconds']} |")
    if rej:
        print("\nrejections by kind: " + ", ".join(f"{k}: {n}" for k, n in Counter(r["kind"] for r in rej).items()))
    print("\n## Planner run (--planner hf:smollm2-135m --planner-share 1.0)\n")
    print("\n".join(candidates_table(pr)))
    print("\n## Optuna-only run\n")
    print("\n".join(candidates_table(orun)))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
