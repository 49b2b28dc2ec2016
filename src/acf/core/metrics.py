"""The one table of metrics: every metric acf measures is one row here, and every other module (objectives, the
evaluator, reward, run records, reports) reads its properties from this table instead of naming it again.

Adding a metric = one row here + its measurement (a back-end method in acf.evaluation.backend, or a task's own
metric). Pure data (the one error it raises is imported when raised).
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

#: the evaluation back ends (acf.evaluation.backend): transformers, llama.cpp for GGUF candidates
BACKENDS = ("transformers", "llamacpp")
#: how acf measures a metric (acf.evaluation.runner.evaluate dispatches on it), when the task does not compute it
#: itself (`Task.task_metrics`, e.g. multiple choice scores accuracy by choice log-likelihood):
#: logits: teacher-forced logits on the task's items; general_text: the same on general text; generation: greedy
#: generation scored by the task; task: only the task computes it; runtime: by running the model in its runtime
#: (speed, memory); disk: from the stored files; model: from the stored or loaded weights
Where = Literal["logits", "general_text", "generation", "task", "runtime", "disk", "model"]


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
    where: Where = "task"              # how acf measures it (see Where)
    default: bool = False              # measured by `acf eval` when no --metrics are given
    cheap: bool = False                # measured for every candidate of a run (disk/header figures)
    held_out: bool = False             # measured for every frontier member in the held-out report
    fidelity_column: int = 0           # position in the report's fidelity table (0: not shown there)
    logged: int = 0                    # position in a candidate's run-log line (0: only when it is an objective)
    control_column: int = 0            # position in the report's control table (adaptation vs compression)
    binary: bool = False               # a share of items right or wrong (its ci95 is a Wilson interval)

    @property
    def objective(self) -> bool:
        return self.direction is not None


_Q = dict(family="quality", unit="fraction", display="f3", normalise="ratio")
_F = dict(family="fidelity", needs_reference=True, held_out=True)

METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "maximize", where="generation", default=True, fidelity_column=5, logged=4, control_column=3,
           binary=True, **_Q),
    Metric("accuracy_norm", "maximize", binary=True, **_Q),
    Metric("mc1", "maximize", binary=True, **_Q),
    Metric("mc2", "maximize", **_Q),
    Metric("pass@1", "maximize", binary=True, **_Q),
    Metric("answer_nll", "minimize", "quality", "nats/token", "f4", "exp_diff", where="logits", default=True,
           fidelity_column=4, logged=3, control_column=1),
    Metric("kld", "minimize", unit="nats/token", display="f4", normalise="exp_neg", where="logits",
           fidelity_column=1, logged=1, control_column=2, **_F),
    Metric("kld_general", "minimize", unit="nats/token", display="f4", normalise="exp_neg", where="general_text",
           fidelity_column=3, **_F),
    Metric("top1", "maximize", unit="fraction", display="f3", normalise="ratio", where="logits", fidelity_column=2,
           logged=2, **_F),
    Metric("latency", "minimize", "model", "ms/token", "ms", "saving", where="runtime", default=True),
    Metric("ttft", "minimize", "model", "ms", "ms", "saving", where="runtime"),
    Metric("throughput", "maximize", "model", "tokens/s", "f4", "gain", where="runtime"),
    Metric("memory", "minimize", "model", "bytes", "mib", "saving", where="runtime", default=True),
    Metric("size", "minimize", "model", "bytes", "mib", "saving", where="disk", default=True, cheap=True, logged=5),
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


def _ordered(column: str) -> tuple[str, ...]:
    rows = [m for m in METRICS if getattr(m, column)]
    return tuple(m.name for m in sorted(rows, key=lambda m: getattr(m, column)))


def fidelity_columns() -> tuple[str, ...]:
    """The report's fidelity table columns, in their order."""
    return _ordered("fidelity_column")


def control_columns() -> tuple[str, ...]:
    """The metrics of the report's control table (adaptation vs compression), in their order."""
    return _ordered("control_column")


def logged() -> tuple[str, ...]:
    """The metrics a candidate's run-log line shows after its objectives, in their order."""
    return _ordered("logged")


def check_backend(name: str, backend: str) -> None:
    """Refuse a metric the back end cannot measure (its row's `backends`)."""
    row = TABLE.get(name)
    if row is not None and backend not in row.backends:
        from acf.core.errors import AcfError

        raise AcfError(f"metric {name!r} is not measured in {backend} (only in {', '.join(row.backends)})")
