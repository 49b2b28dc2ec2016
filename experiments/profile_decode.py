#!/usr/bin/env python3
"""Where a large-batch decode step of an 8B model spends its time on the GPU (issue #18; prints, not a test).

A Llama-3.1-8B-shaped model with random weights (speed does not depend on weight values) generates from real GSM8K
prompts through transformers `generate`, greedy, as acf's padded engine calls it. The per-step time is measured as
(time of 40 new tokens - time of 8 new tokens) / 32, so prompt prefill and set-up cancel out. Variants:
  attention  sdpa (transformers' path: repeat_kv under the padding mask) | fold (acf.evaluation.gqa_attention)
  cache      dynamic (transformers' default, torch.cat per step) | static (preallocated, no torch.compile)
  batch      the sizes given by --batches
and a torch.profiler table (top CUDA kernels) of one 8-token generate per attention variant at the first batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--batches", default="221,400")
    ap.add_argument("--variants", default="sdpa/dynamic,fold/dynamic,sdpa/static,fold/static")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU check of the script's logic")
    a = ap.parse_args()
    from acf.evaluation.gqa_attention import register
    from acf.models.tokenization import prompt_text
    from acf.models.loading import load_tokenizer
    from bench_scale import build, gsm8k_test_prompts, llama31_8b_config

    dev = "cpu" if a.tiny else "cuda"
    tok = load_tokenizer(a.tokenizer)
    tok.padding_side = "left"
    batches = [int(b) for b in a.batches.split(",")]
    prompts = [prompt_text(tok, p) for p in gsm8k_test_prompts(tok, a.data_dir, max(batches))]
    prompts.sort(key=len, reverse=True)
    model = build(llama31_8b_config(layers=a.layers, tiny=a.tiny), dev)
    fold = register()
    res: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
                 "layers": a.layers, "rows": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    def gen(enc, new: int, static: bool) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, temperature=None,
                           top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                           **({"cache_implementation": "static", "disable_compile": True} if static else {}))
        sync()
        return time.perf_counter() - t

    for b in batches:
        enc = tok(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        for v in a.variants.split(","):
            attn, cache = v.split("/")
            model.set_attn_implementation(fold if attn == "fold" else "sdpa")
            static = cache == "static"
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                gen(enc, 2, static)                       # warm-up
                t8, t40 = gen(enc, 8, static), gen(enc, 40, static)
            except torch.OutOfMemoryError as e:
                res["rows"].append({"batch": b, "attention": attn, "cache": cache, "error": str(e)[:200]})
                continue
            step = (t40 - t8) / 32
            row = {"batch": b, "prompt_tokens": enc["input_ids"].shape[1], "attention": attn, "cache": cache,
                   "ms_per_step": round(step * 1e3, 2), "tokens_per_s": round(b / step, 1),
                   "prefill_plus_8_steps_s": round(t8, 3),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "profile-decode.json").write_text(json.dumps(res, indent=2))
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        b = batches[0]
        enc = tok(prompts[:b], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        for attn in ("sdpa", "fold"):
            model.set_attn_implementation(fold if attn == "fold" else "sdpa")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                gen(enc, 8, False)
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
            (out / f"profile-{attn}-b{b}.txt").write_text(table)
            print(f"== {attn} batch {b} ==\n" + table, flush=True)
    (out / "profile-decode.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
