"""Run the real lm-evaluation-harness on an acf model directory (`--backend lm-eval`).

Why: acf's own scorers are fast and fit the search loop, but a number that a reader can reproduce with the
community harness is worth more in a report, and agreement between the two is a check on both. This module
writes lm-eval task YAMLs that read acf's local data files (`dataset_path: json|csv` + `data_files`), so it
runs offline, with the same prompts and the same evaluated items as acf's scorer:

- gsm8k: zero-shot, chat template, acf's instruction, greedy, 256 new tokens; scored by acf's own answer
  extraction (a `process_results` hook), so only the generation machinery differs;
- commonsenseqa: 'Question: {question}\\nAnswer:' + ' {choice}' log-likelihood (acc, acc_norm), the first dev
  items in file order (acf's "test" split starts at the same item);
- truthfulqa: mc1 and mc2 with the 6-shot QA primer, on acf's "test" split (every 8th question held out).

Tasks without local data (or bbh / humaneval) go to lm-eval's built-in task of that name, which needs the hub.
Requires the optional dependency `lm-eval` (acf[lmeval]).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from acf.core.errors import AcfError
from acf.core.intervals import wilson_interval
from acf.core.metrics import TABLE
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.evaluation.sandbox import CONSENT_MESSAGE
from acf.tasks.data import locate
from acf.tasks.truthfulqa import QA_PRIMER

GSM8K_INSTRUCTION = "Solve it step by step, then give the final answer after '####'."

_UTILS = '''"""Hooks for acf-generated lm-eval tasks (written by acf.evaluation.lm_eval_bridge)."""
import math


def gsm8k_results(doc, results):
    from acf.tasks.gsm8k import extract_answer
    got = extract_answer(results[0])
    return {"acc": float(got is not None and got == extract_answer(doc["answer"]))}


def _split(s):
    return [a.strip() for a in (s or "").split(";") if a.strip()]


def truthfulqa_docs(dataset):
    """CSV rows -> lm-eval's mc1_targets / mc2_targets, keeping acf's evaluated split (i % 8 != 7)."""
    keep = [i for i in range(len(dataset)) if i % 8 != 7]
    dataset = dataset.select(keep)

    def conv(d):
        best = d["Best Answer"].strip()
        correct = _split(d["Correct Answers"])
        if best not in correct:
            correct = [best] + correct
        incorrect = _split(d["Incorrect Answers"])
        return {"question": d["Question"].strip(),
                "mc1_targets": {"choices": [best] + incorrect, "labels": [1] + [0] * len(incorrect)},
                "mc2_targets": {"choices": correct + incorrect, "labels": [1] * len(correct) + [0] * len(incorrect)}}

    return dataset.map(conv, remove_columns=dataset.column_names)


def truthfulqa_mc2(doc, results):
    lls = [r[0] for r in results]
    n_true = sum(doc["mc2_targets"]["labels"])
    m = max(lls)
    p = [math.exp(x - m) for x in lls]
    return {"acc": sum(p[:n_true]) / sum(p)}
'''


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def _task_yaml(name: str, data: Path, output_type: str, body: str, metrics: tuple[str, ...] = ("acc",)) -> str:
    """One lm-eval task YAML over a local data file (`json` for .jsonl, `csv` for .csv): what every acf task shares.

    `body` holds the task's own keys (prompt, choices, hooks), one `key: value` line each; each metric in `metrics`
    is averaged over items, higher is better.
    """
    fmt = "csv" if data.suffix == ".csv" else "json"
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return (f"task: {name}\ndataset_path: {fmt}\ndataset_kwargs:\n  data_files:\n    test: {_q(str(data))}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}metric_list:\n{metric_list}metadata:\n  version: 1.0\n")


def _yamls(task: str, d: Path, max_new_tokens: int) -> dict[str, str]:
    """{file name: YAML text} for the local-data version of `task`; the lm-eval task names are acf_<...>."""
    if task == "gsm8k":
        return {"acf_gsm8k.yaml": _task_yaml("acf_gsm8k", d / "test.jsonl", "generate_until", f"""\
doc_to_text: {_q('{{question.strip()}}' + chr(10) + GSM8K_INSTRUCTION)}
doc_to_target: "{{{{answer}}}}"
num_fewshot: 0
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
process_results: !function utils.gsm8k_results
""")}
    if task == "commonsenseqa":
        return {"acf_commonsenseqa.yaml": _task_yaml("acf_commonsenseqa", d / "dev_rand_split.jsonl", "multiple_choice",
                                                     f"""\
doc_to_text: {_q('Question: {{question.strip()}}' + chr(10) + 'Answer:')}
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
target_delimiter: " "
""", metrics=("acc", "acc_norm"))}
    if task == "truthfulqa":
        common = f"""\
process_docs: !function utils.truthfulqa_docs
doc_to_text: {_q(QA_PRIMER + chr(10) + chr(10) + 'Q: {{question}}' + chr(10) + 'A:')}
doc_to_target: 0
target_delimiter: " "
"""
        return {f"acf_truthfulqa_{mc}.yaml": _task_yaml(
                    f"acf_truthfulqa_{mc}", d / "TruthfulQA.csv", "multiple_choice",
                    common + f'doc_to_choice: "{{{{{mc}_targets.choices}}}}"\n'
                    + ("process_results: !function utils.truthfulqa_mc2\n" if mc == "mc2" else ""))
                for mc in ("mc1", "mc2")}
    return {}


#: acf metric name for each (lm-eval task, lm-eval metric)
_LOCAL_METRICS = {
    "acf_gsm8k": {"acc": "accuracy"},
    "acf_commonsenseqa": {"acc": "accuracy", "acc_norm": "accuracy_norm"},
    "acf_truthfulqa_mc1": {"acc": "mc1"},
    "acf_truthfulqa_mc2": {"acc": "mc2"},
}
_LOCAL_FILES = {"gsm8k": ("test.jsonl",), "commonsenseqa": ("dev_rand_split.jsonl",), "truthfulqa": ("TruthfulQA.csv",)}
#: lm-eval built-in tasks used when no local data exists (they download from the hub)
_BUILTIN = {"gsm8k": ["gsm8k"], "commonsenseqa": ["commonsense_qa"], "truthfulqa": ["truthfulqa_mc1", "truthfulqa_mc2"],
            "bbh": ["bbh_cot_fewshot"], "humaneval": ["humaneval"]}


def lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # not installed
        return ""


def run_lm_eval(model_dir: str | os.PathLike, task: str, limit: Optional[int] = None,
                data_dir: Optional[str] = None, device: str = "cpu", *, batch_size: int = 8,
                max_new_tokens: int = 256, allow_code_execution: bool = False, keep_dir: Optional[str] = None):
    """Evaluate `model_dir` on `task` with lm-evaluation-harness; an `EvalResult` of Measurements.

    `limit`: the first `limit` evaluated items (file order; acf's own scorer matches with `seed=None`).
    `keep_dir`: where to leave the generated YAMLs (default: a temporary folder removed afterwards).
    """
    from acf.evaluation.runner import EvalResult

    if not lm_eval_version():
        raise AcfError("--backend lm-eval needs lm-evaluation-harness: pip install 'acf[lmeval]' (or lm-eval)")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AcfError(f"model directory {model_dir} has no config.json")
    base, _, sub = task.partition(":")
    if base not in _BUILTIN:
        raise AcfError(f"--backend lm-eval knows tasks {', '.join(sorted(_BUILTIN))}, not {task!r}")
    if base == "humaneval" and not allow_code_execution:
        raise AcfError(CONSENT_MESSAGE)
    if limit is not None and limit <= 0:
        raise AcfError(f"--limit must be a positive number of items (got {limit})")

    import lm_eval
    from lm_eval.tasks import TaskManager

    local = locate(base, data_dir, _LOCAL_FILES[base]) if base in _LOCAL_FILES else None
    tmp = None
    if local is not None:
        folder = Path(keep_dir) if keep_dir else Path(tmp := tempfile.mkdtemp(prefix="acf-lmeval-"))
        folder.mkdir(parents=True, exist_ok=True)
        yamls = _yamls(base, local, max_new_tokens)
        for name, text in yamls.items():
            (folder / name).write_text(text)
        (folder / "utils.py").write_text(_UTILS)
        names = [n[:-5] for n in yamls]
        tm = TaskManager(include_path=str(folder), include_defaults=False)
        source = f"local files in {local} (generated YAML: {', '.join(yamls)})"
    else:
        names = [f"bbh_cot_fewshot_{sub}"] if base == "bbh" and sub else _BUILTIN[base]
        tm = TaskManager()
        source = f"lm-eval built-in task(s) {', '.join(names)} (hub data)"
    t0 = time.perf_counter()
    dtype = "float32" if device == "cpu" else "bfloat16"
    try:
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype={dtype}", tasks=names, task_manager=tm,
            limit=limit, device=device, batch_size=batch_size, apply_chat_template=(base == "gsm8k"),
            log_samples=False, bootstrap_iters=0, confirm_run_unsafe_code=allow_code_execution)
    except AcfError:
        raise
    except Exception as e:  # the harness' own errors (missing data offline, unknown task) as one line
        raise AcfError(f"lm-eval failed on {task}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    secs = round(time.perf_counter() - t0, 3)
    out: dict[str, Measurement] = {}
    n_samples = res.get("n-samples", {})
    for tname, metrics in res["results"].items():
        mapping = _LOCAL_METRICS.get(tname, {})
        n = int((n_samples.get(tname) or {}).get("effective") or 0) or None
        for key, val in metrics.items():
            if not isinstance(val, (int, float)) or "stderr" in key or key in ("alias", "sample_len"):
                continue
            metric, _, filt = key.partition(",")
            name = mapping.get(metric) or (f"{tname}/{metric}" + (f"[{filt}]" if filt and filt != "none" else ""))
            if name in out:
                continue
            binary = name in TABLE and TABLE[name].binary and n
            out[name] = Measurement(
                value=float(val), unit="fraction", device=device_string(device),
                runtime=f"{runtime_string()}, lm-eval {lm_eval_version()}", n=n, seconds=secs,
                ci95=wilson_interval(round(val * n), n) if binary else None,
                method=f"lm-evaluation-harness {lm_eval_version()} (hf backend, batch {batch_size}), {tname} "
                       f"metric {key}; {source}",
                extra={"lm_eval_task": tname, "lm_eval_metric": key})
    return EvalResult(model_path=str(model_dir), task=task, metrics=out, seconds=secs)
