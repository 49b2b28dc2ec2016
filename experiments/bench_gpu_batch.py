#!/usr/bin/env python3
"""GPU waste in evaluation, before/after (issue: GPU path): fixed evaluation batch vs memory-sized batch.

Accuracy (greedy generation) and answer NLL on the same GSM8K test items, for the bf16 default model and its
llm-compressor GPTQ W4 g64 version (compressed-tensors, run dequantized by transformers), with
(before) the fixed batch the pipeline used (256) and (after) acf.evaluation.batching's auto size. Prints wall
seconds and whether the extracted answers agree (batch composition changes bf16 rounding, so a few may differ). Writes
experiments/results/gpu-batch.json. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    import torch

    from acf.evaluation.quality import accuracy, answer_nll
    from acf.methods import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import free, load_model, resolve_model
    from acf.core.provenance import device_string, runtime_string
    from acf.methods.strategy import Strategy
    from acf.tasks import get_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1319)
    ap.add_argument("--before", type=int, default=256)
    ap.add_argument("--work", default="/tmp/acf-bench-batch")
    ap.add_argument("--out", default=str(RESULTS / "gpu-batch.json"))
    ap.add_argument("--models", default="baseline,gptq", help="baseline and/or gptq")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    task = get_task("gsm8k")
    base = resolve_model("smollm2-135m")
    items = task.load("test", limit=a.limit, seed=0)
    gptq = Path(a.work) / "gptq-w4g64"
    wanted = a.models.split(",")
    if "gptq" in wanted and not (gptq / "config.json").exists():
        run_strategy(Strategy.model_validate({"steps": [{"method": "gptq", "params": {"bits": 4, "group_size": 64,
                                                                                      "calib_samples": 64}}]}),
                     base, gptq, StepContext(device="cuda", task=task, teacher_dir=base, seed=0))
    report = {"device": device_string("cuda"), "runtime": runtime_string(), "items": len(items), "models": {}}
    for key, name, path in (("baseline", "bf16 baseline", base), ("gptq", "gptq W4 g64 (compressed-tensors)", gptq)):
        if key not in wanted:
            continue
        model, tok = load_model(path, "cuda")
        row = {}
        for label, bs in (("before", a.before), ("after", None)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m, preds = accuracy(model, tok, task, items, batch_size=bs)
            torch.cuda.synchronize()
            acc_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            nll = answer_nll(model, tok, task, items, batch_size=bs)
            torch.cuda.synchronize()
            nll_s = time.perf_counter() - t0
            row[label] = {"batch": m.method, "accuracy": m.value, "accuracy_seconds": round(acc_s, 2),
                          "nll": nll.value, "nll_batch": nll.method, "nll_seconds": round(nll_s, 2),
                          "generated_tokens": m.extra.get("generated_tokens"),
                          "extracted": [p["extracted"] for p in preds]}
            print(f"{name:36s} {label:6s} accuracy {m.value:.4f} in {acc_s:7.1f} s ({m.method}); "
                  f"answer NLL {nll.value:.4f} in {nll_s:5.1f} s", flush=True)
        same = sum(x == y for x, y in zip(row["before"].pop("extracted"), row["after"].pop("extracted")))
        row["same_extracted_answer_share"] = same / len(items)
        row["speedup_accuracy"] = round(row["before"]["accuracy_seconds"] / row["after"]["accuracy_seconds"], 2)
        row["speedup_nll"] = round(row["before"]["nll_seconds"] / max(row["after"]["nll_seconds"], 1e-9), 2)
        print(f"{name}: accuracy {row['speedup_accuracy']}x faster, answer NLL {row['speedup_nll']}x; "
              f"same extracted answer on {same}/{len(items)} items", flush=True)
        report["models"][name] = row
        free(model)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
