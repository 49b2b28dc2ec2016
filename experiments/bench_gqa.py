#!/usr/bin/env python3
"""Generation with grouped-query attention folded (acf.evaluation.gqa_attention) vs transformers' sdpa path, which
copies keys and values once per query head under the padding mask (issue #18: generation near the hardware's speed).

The default model (SmolLM2-135M: 9 query heads over 3 KV heads), GSM8K test prompts in acf's permutation, greedy,
acf's padded engine at the given batch, on whatever device is present (the CPU here; `--device cuda` on the lent
GPU). Runs alternate before/after `--repeats` times on the same prompts (after a warm-up batch) so drift in a shared
machine's speed falls on both; the texts must be identical (same greedy tokens). Writes experiments/results/
gqa-<device>.json and prints a markdown table. The 8B-shape GPU figure is bench_scale's `padded_repeat_kv` row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).parent / "results"


def run_once(model, tok, prompts: list[str], new: int, batch: int, fold: bool, dev: str) -> tuple[float, list, str]:
    import torch

    from acf.evaluation.generate import generate_all

    os.environ["ACF_GQA_FOLD"] = "1" if fold else "0"
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs, how = generate_all(model, tok, prompts, new, batch_size=batch)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, outs, how


def main() -> None:
    from acf.core.provenance import device_string, runtime_string
    from acf.models.loading import load_model, resolve_model
    from acf.tasks import get_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=96, help="max new tokens")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    task = get_task("gsm8k")
    model, tok = load_model(resolve_model("smollm2-135m"), a.device)
    prompts = [task.chat_prompt(it, tok, 0) for it in task.load("test", limit=a.prompts, seed=0)]
    run_once(model, tok, prompts[: a.batch], 8, a.batch, True, a.device)       # warm-up, both paths share it
    run_once(model, tok, prompts[: a.batch], 8, a.batch, False, a.device)
    rows: dict[str, list[float]] = {"sdpa (repeat_kv)": [], "folded": []}
    texts: dict[str, list] = {}
    how: dict[str, str] = {}
    for _ in range(a.repeats):
        for name, fold in (("sdpa (repeat_kv)", False), ("folded", True)):
            secs, outs, how[name] = run_once(model, tok, prompts, a.new, a.batch, fold, a.device)
            rows[name].append(secs)
            texts.setdefault(name, outs)
    tokens = sum(n for _, n in texts["folded"])
    same = texts["folded"] == texts["sdpa (repeat_kv)"]
    res = {"device": device_string(a.device), "runtime": runtime_string(), "model": "smollm2-135m",
           "dtype": str(next(model.parameters()).dtype), "prompts": len(prompts), "max_new_tokens": a.new,
           "batch": a.batch, "repeats": a.repeats, "generated_tokens": tokens, "identical_texts": same,
           "engines": how,
           "seconds": {k: [round(s, 2) for s in v] for k, v in rows.items()},
           "tokens_per_s_median": {k: round(tokens / statistics.median(v), 1) for k, v in rows.items()}}
    res["speedup_median"] = round(statistics.median(rows["sdpa (repeat_kv)"]) / statistics.median(rows["folded"]), 3)
    out = RESULTS / f"gqa-{'cuda' if a.device.startswith('cuda') else 'cpu'}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"| path | seconds ({a.repeats} runs) | tokens/s (median) |\n|---|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {', '.join(f'{s:.1f}' for s in v)} | {res['tokens_per_s_median'][k]} |")
    print(f"\n{res['device']}; {len(prompts)} GSM8K prompts x <= {a.new} new tokens ({tokens} generated), batch "
          f"{a.batch}; identical texts: {same}; speedup (median) {res['speedup_median']}x -> {out}")


if __name__ == "__main__":
    main()
