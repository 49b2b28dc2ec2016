"""The one table of metrics: every metric acf measures is one row here, and every other module (objectives, the
evaluator, reward, run records, reports) reads its properties from this table instead of naming it again.

Adding a metric = one row here + its measurement (a back-end method in acf.evaluation.backend, or a task's own
metric). Pure data: no imports from the rest of acf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

Direction = Literal["maximize", "minimize"]
#: quality: how well the model does the task; fidelity: closeness to the run's uncompressed baseline (offered on
#: every task, measured against the baseline's reference); model: what the model costs (size, speed, memory)
Family = Literal["quality", "fidelity", "model"]
#: how the reward puts a metric on a unitless scale against the baseline (acf.search.reward.normalised_score)
Normalise = Literal["ratio", "exp_diff", "exp_neg", "gain", "saving"]
#: how a value is shown in run logs (`display`): MiB, ms, 3 or 4 decimals, millions
Display = Literal["mib", "ms", "f3", "f4", "millions"]

BACKENDS = ("transformers", "llamacpp")
#: where a model metric is measured: on disk (cheap, no model load), or by running the model in its runtime
Where = Literal["disk", "runtime", "model", "items"]


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Optional[Direction]     # None: reported, never an objective (sparsity)
    family: Family
    unit: str
    display: Display
    normalise: Normalise
    needs_reference: bool = False      # compared against the baseline's logits (acf.evaluation.shared.Fidelity)
    backends: tuple[str, ...] = BACKENDS
    where: Where = "items"             # items: measured on the task's items; runtime: in the model's runtime
    default: bool = False              # measured by `acf eval` when no --metrics are given
    cheap: bool = False                # measured for every candidate of a run (disk/header figures)
    held_out: bool = False             # measured for every frontier member in the held-out report
    fidelity_column: int = 0           # position in the report's fidelity table (0: not shown there)

    @property
    def objective(self) -> bool:
        return self.direction is not None


_Q = dict(family="quality", unit="fraction", display="f3", normalise="ratio")
_F = dict(family="fidelity", needs_reference=True, held_out=True)

METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "maximize", default=True, fidelity_column=5, **_Q),
    Metric("accuracy_norm", "maximize", **_Q),
    Metric("mc1", "maximize", **_Q),
    Metric("mc2", "maximize", **_Q),
    Metric("pass@1", "maximize", **_Q),
    Metric("answer_nll", "minimize", "quality", "nats/token", "f4", "exp_diff", default=True, fidelity_column=4),
    Metric("kld", "minimize", unit="nats/token", display="f4", normalise="exp_neg", fidelity_column=1, **_F),
    Metric("kld_general", "minimize", unit="nats/token", display="f4", normalise="exp_neg", fidelity_column=3, **_F),
    Metric("top1", "maximize", unit="fraction", display="f3", normalise="ratio", fidelity_column=2, **_F),
    Metric("latency", "minimize", "model", "ms/token", "ms", "saving", where="runtime", default=True),
    Metric("ttft", "minimize", "model", "ms", "ms", "saving", where="runtime"),
    Metric("throughput", "maximize", "model", "tokens/s", "f4", "gain", where="runtime"),
    Metric("memory", "minimize", "model", "bytes", "mib", "saving", where="runtime", default=True),
    Metric("size", "minimize", "model", "bytes", "mib", "saving", where="disk", default=True, cheap=True),
    Metric("params", "minimize", "model", "count", "millions", "saving", where="model", default=True, cheap=True),
    Metric("sparsity", None, "model", "fraction", "f3", "gain", where="model", default=True, cheap=True),
    Metric("bits_per_weight", "minimize", "model", "bits", "f4", "saving", where="model", default=True, cheap=True),
)

TABLE: dict[str, Metric] = {m.name: m for m in METRICS}


def get(name: str) -> Optional[Metric]:
    return TABLE.get(name)


def names(*, family: Optional[str] = None, where: Optional[str] = None, objective: Optional[bool] = None,
          **flags: bool) -> tuple[str, ...]:
    """Metric names in table order, filtered by family, where, objective and boolean columns (e.g. cheap=True)."""
    return tuple(m.name for m in METRICS
                 if (family is None or m.family == family) and (where is None or m.where == where)
                 and (objective is None or m.objective == objective)
                 and all(getattr(m, k) == v for k, v in flags.items()))


def display(name: str, v: float) -> str:
    """A value as run logs show it (MiB, ms, 3 or 4 decimals); unknown names get 4 decimals."""
    how = TABLE[name].display if name in TABLE else "f4"
    if how == "mib":
        return f"{v / 2**20:.1f} MiB"
    if how == "ms":
        return f"{v:.1f} ms"
    if how == "f3":
        return f"{v:.3f}"
    if how == "millions":
        return f"{v / 1e6:.1f}M"
    return f"{v:.4f}"


def fidelity_columns() -> tuple[str, ...]:
    """The report's fidelity table columns, in their order."""
    return tuple(m.name for m in sorted((m for m in METRICS if m.fidelity_column), key=lambda m: m.fidelity_column))
