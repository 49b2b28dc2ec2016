"""Objectives: the metrics a run may rank on, their directions and the --objectives check. The names and
properties come from the metric table (acf.core.metrics); used by Pareto, reward, search and reports."""

from __future__ import annotations

from acf.core.metrics import METRICS, Direction, names

#: the objectives (metrics that may be ranked on) and their directions, from the metric table (acf.core.metrics)
DIRECTIONS: dict[str, Direction] = {m.name: m.direction for m in METRICS if m.direction is not None}

#: fidelity to the run's uncompressed baseline: offered on every task (measured against the baseline's reference)
FIDELITY = set(names(family="fidelity"))
QUALITY = set(names(family="quality", objective=True)) | FIDELITY


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
