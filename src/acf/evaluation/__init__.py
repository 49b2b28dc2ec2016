"""Evaluation subagent: task quality (accuracy, answer NLL) and cost (latency, memory, size, bits) with provenance."""

from acf.evaluation.runner import ALL_METRICS, DEFAULT_METRICS, EvalResult, check_metrics, evaluate
from acf.evaluation.stats import wilson_interval

__all__ = ["evaluate", "EvalResult", "check_metrics", "ALL_METRICS", "DEFAULT_METRICS", "wilson_interval"]
