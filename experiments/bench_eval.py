#!/usr/bin/env python3
"""Benchmark the evaluation subagent on the default model (prints its figures; not a test).

(a) accuracy-eval throughput: acf's batched evaluator vs a naive one-question-at-a-time `generate` loop on the
    same items (goal >= 2x on CPU, >= 5x on GPU);
(b) cost of answer_nll vs accuracy on the same items (goal >= 20x cheaper);
(c) the default model's numbers on N test items.
Writes experiments/results/eval-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from acf.evaluation import evaluate  # noqa: E402
from acf.evaluation.quality import accuracy, answer_nll  # noqa: E402
from acf.models.loading import load_model, resolve_device, resolve_model  # noqa: E402
from acf.core.provenance import device_string, runtime_string  # noqa: E402
from acf.tasks import get_task  # noqa: E402


def naive_accuracy(model, tok, task, items, max_new_tokens):
    """The loop a user would write first: one question at a time, fixed max_new_tokens, no early stop per batch."""
    dev = next(model.parameters()).device
    correct, toks = 0, 0
    for it in items:
        enc = tok([task.chat_prompt(it, tok)], return_tensors="pt", add_special_tokens=False).to(dev)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        toks += out.shape[1] - enc["input_ids"].shape[1]
        correct += task.score(text, it)[0]
    return correct, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default=None)
    ap.add_argument("--n-speed", type=int, default=16, help="items for (a) and (b)")
    ap.add_argument("--n-full", type=int, default=200, help="items for (c)")
    ap.add_argument("--full-accuracy", action="store_true", help="(c) also measures generation accuracy on n-full")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    dev = resolve_device(a.device)
    bs = a.batch_size or (128 if dev.startswith("cuda") else 8)
    task = get_task("gsm8k")
    path = resolve_model("smollm2-135m")
    model, tok = load_model(path, dev)
    items = task.load("test", limit=a.n_speed, seed=0)
    res: dict = {"device": device_string(dev), "runtime": runtime_string(), "batch_size": bs,
                 "max_new_tokens": a.max_new_tokens, "model": "smollm2-135m", "task": "gsm8k"}
    # warm-up
    answer_nll(model, tok, task, items[:2], batch_size=2)
    # (a)
    t0 = time.perf_counter()
    k_naive, tok_naive = naive_accuracy(model, tok, task, items, a.max_new_tokens)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    m_acc, _ = accuracy(model, tok, task, items, batch_size=bs, max_new_tokens=a.max_new_tokens)
    t_batched = time.perf_counter() - t0
    res["a_accuracy_speed"] = {"n": len(items), "naive_seconds": round(t_naive, 2), "batched_seconds": round(t_batched, 2),
                               "speedup": round(t_naive / t_batched, 2), "naive_correct": k_naive,
                               "batched_correct": m_acc.extra["correct"], "naive_tokens": int(tok_naive),
                               "batched_tokens": m_acc.extra["generated_tokens"]}
    print(f"(a) accuracy on {len(items)} items: naive {t_naive:.1f} s, batched {t_batched:.1f} s -> "
          f"{t_naive / t_batched:.2f}x")
    # (b)
    t0 = time.perf_counter()
    m_nll = answer_nll(model, tok, task, items, batch_size=bs)
    t_nll = time.perf_counter() - t0
    res["b_nll_vs_accuracy"] = {"n": len(items), "answer_nll_seconds": round(t_nll, 3),
                                "accuracy_seconds": round(t_batched, 2), "ratio": round(t_batched / t_nll, 1)}
    print(f"(b) answer_nll {t_nll:.2f} s vs accuracy {t_batched:.1f} s on the same items -> {t_batched / t_nll:.1f}x cheaper")
    del model
    # (c)
    mets = ["answer_nll", "latency", "memory", "size", "params", "bits_per_weight"]
    if a.full_accuracy:
        mets.insert(1, "accuracy")
    r = evaluate(path, task, mets, limit=a.n_full, seed=0, device=dev, batch_size=bs, max_new_tokens=a.max_new_tokens,
                 show_progress=False)
    res["c_default_model"] = {k: v.model_dump() for k, v in r.metrics.items()}
    for k, v in r.metrics.items():
        print(f"(c) {k}: {v.value} {v.unit} (n={v.n}, {v.seconds} s) {v.ci95 or ''}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if dev.startswith("cuda") else "cpu"
    (out / f"eval-{tag}.json").write_text(json.dumps(res, indent=2))
    md = [f"# bench_eval on {res['device']}", "", f"runtime: {res['runtime']}; batch {bs}; max_new_tokens "
          f"{a.max_new_tokens}; model smollm2-135m; GSM8K test items (seed 0)", "",
          "| figure | value |", "|---|---|",
          f"| (a) naive loop, {len(items)} items | {t_naive:.1f} s |",
          f"| (a) batched evaluator, same items | {t_batched:.1f} s |",
          f"| (a) speed-up | {t_naive / t_batched:.2f}x |",
          f"| (b) answer_nll on same items | {t_nll:.2f} s ({t_batched / t_nll:.1f}x cheaper than accuracy) |"]
    for k, v in r.metrics.items():
        ci = f" [{v.ci95[0]:.3f}, {v.ci95[1]:.3f}]" if v.ci95 else ""
        md.append(f"| (c) {k} (n={v.n}) | {v.value:.4g} {v.unit}{ci} |")
    (out / f"eval-{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
