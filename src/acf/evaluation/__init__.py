"""Evaluation subagent: task quality (accuracy, answer NLL) and cost (latency, memory, size, bits) with provenance.

`evaluate` and its companions are loaded from `runner` on first use, so a light module of this package (the sanity
report read by `acf report`, the scored sequences) does not bring torch in with the package. `wilson_interval`
lives in acf.core.intervals."""

from typing import TYPE_CHECKING, Any

from acf.core.intervals import wilson_interval

if TYPE_CHECKING:
    from acf.evaluation.runner import ALL_METRICS, DEFAULT_METRICS, EvalResult, check_metrics, evaluate

__all__ = ["evaluate", "EvalResult", "check_metrics", "ALL_METRICS", "DEFAULT_METRICS", "wilson_interval"]

_FROM_RUNNER = {"evaluate", "EvalResult", "check_metrics", "ALL_METRICS", "DEFAULT_METRICS"}


def __getattr__(name: str) -> Any:
    if name in _FROM_RUNNER:
        from acf.evaluation import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'acf.evaluation' has no attribute {name!r}")
