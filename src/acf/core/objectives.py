"""Objective names and their directions. Pure data: used by Pareto, reward, search and reports."""

from __future__ import annotations

from typing import Literal

Direction = Literal["maximize", "minimize"]

DIRECTIONS: dict[str, Direction] = {
    "accuracy": "maximize",
    "accuracy_norm": "maximize",
    "mc1": "maximize",
    "mc2": "maximize",
    "pass@1": "maximize",
    "answer_nll": "minimize",
    "kld": "minimize",
    "kld_general": "minimize",
    "top1": "maximize",
    "latency": "minimize",
    "ttft": "minimize",
    "throughput": "maximize",
    "memory": "minimize",
    "size": "minimize",
    "params": "minimize",
    "bits_per_weight": "minimize",
}

#: fidelity to the run's uncompressed baseline: offered on every task (measured against the baseline's reference)
FIDELITY = {"kld", "kld_general", "top1"}
QUALITY = {"accuracy", "accuracy_norm", "mc1", "mc2", "pass@1", "answer_nll"} | FIDELITY


def direction(name: str) -> Direction:
    try:
        return DIRECTIONS[name]
    except KeyError:
        from acf.core.errors import AcfError

        raise AcfError(f"unknown objective {name!r}: choose from {', '.join(DIRECTIONS)}") from None


def parse_objectives(text: str | list[str], task_metrics: tuple[str, ...] = ()) -> list[str]:
    from acf.core.errors import AcfError

    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for n in names:
        direction(n)
        if n in QUALITY and n not in FIDELITY and task_metrics and n not in task_metrics:
            raise AcfError(f"objective {n!r} is not offered by this task (it offers {', '.join(task_metrics)})")
    if len(set(names)) < 2:
        raise AcfError(f"--objectives needs at least 2 distinct objectives (got {', '.join(names) or 'none'})")
    if not any(n in QUALITY for n in names):
        raise AcfError("--objectives needs at least one quality objective (e.g. kld, answer_nll or accuracy)")
    return list(dict.fromkeys(names))
