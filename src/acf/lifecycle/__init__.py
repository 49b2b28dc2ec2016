"""The adapter loop for a personal/task model: collect good pairs -> train a LoRA/QLoRA adapter -> eval -> promote.

- collect: keeps {prompt, answer} rows whose score >= threshold and that a person approved, drops duplicates
  (also against what the dataset already holds, so it only grows), refuses rows carrying secret-looking strings
  (a training set is the worst place for a leaked key: the model may learn to repeat it), records stats.
- train: a real PEFT LoRA (or QLoRA on a bitsandbytes 4-bit base) from a strict JSON config, capped in steps and
  minutes; the adapter is saved unmerged under output_dir/<date-time>/ with metrics and a loss curve.
- eval: base vs adapted on the held-out 20% (chosen by a hash of each row, so a row never moves between
  train and held-out as the dataset grows) plus guard rows (safety/format) from a CSV, with a pluggable scorer.
- promote: only if the adapter wins by >= 0.05 on average and no guard category regresses; recorded in the
  registry (channel "adapter"); rollback restores an earlier adapter and keeps the last 3.

Modules: `dataset` (collect, the held-out split), `training` (train), `evaluation` (eval, scorers), `promotion`
(promote, rollback). Every public name stays importable from `acf.lifecycle`.
"""

from __future__ import annotations

from acf.lifecycle.dataset import (SECRET_PATTERNS, CollectStats, collect, find_secrets, load_dataset, read_rows,
                                   row_field, row_key, split_rows, stats_path)
from acf.lifecycle.evaluation import (SCORERS, AdapterEval, EvalGroup, auto_scorer, contains, eval_table,
                                      evaluate_adapter, exact_numeric, normalise_text, register_scorer,
                                      resolve_adapter_dir, score, token_f1)
from acf.lifecycle.promotion import MIN_GAIN, promote_adapter, rollback_adapter
from acf.lifecycle.training import (KEEP_ADAPTERS, TrainConfig, TrainResult, keep_last_adapters, load_base,
                                    load_train_config, prompt_text, train)

__all__ = [
    "SECRET_PATTERNS", "CollectStats", "collect", "find_secrets", "load_dataset", "read_rows", "row_field", "row_key",
    "split_rows", "stats_path", "SCORERS", "AdapterEval", "EvalGroup", "auto_scorer", "contains", "eval_table",
    "evaluate_adapter", "exact_numeric", "normalise_text", "register_scorer", "resolve_adapter_dir", "score",
    "token_f1", "MIN_GAIN", "promote_adapter", "rollback_adapter", "KEEP_ADAPTERS", "TrainConfig", "TrainResult",
    "keep_last_adapters", "load_base", "load_train_config", "prompt_text", "train",
]
