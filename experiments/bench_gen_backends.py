#!/usr/bin/env python3
"""First-call vs repeated-call generation speed of acf's padded engine at Llama-3.1-8B shape, per SDPA backend
(issue #18; prints its figures, not a test).

Why: in bench_scale the first folded run of 400 GSM8K prompts took 34.9 s and an identical second run 14.9 s on
the same H100. The suspect was torch's cuDNN attention backend, which builds an execution plan per new input shape
(each decode step has a new key length); the memory-efficient backend has no per-shape plans. Each row runs the
same 400 prompts x 256 new tokens twice on a model loaded once (random weights: every row runs full length).
Found (H100, results/gen-backends-h100.json): folded, first call 33.1 s with cuDNN allowed, 16.8 s without; second
calls 14.8 vs 14.3 s. acf's engine has excluded cuDNN attention from generation since (ACF_GEN_CUDNN_SDPA=1 allows
it, which the `cudnn` configurations here set).
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--configs", default="fold/nocudnn,fold/cudnn,repeat_kv/cudnn,repeat_kv/nocudnn")
    ap.add_argument("--batch", type=int, default=None, help="default: acf's auto batch size (batching.py)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    from acf.evaluation.batching import auto_batch_size
    from acf.evaluation.generate import generate_all
    from acf.models.loading import load_tokenizer
    from bench_scale import build, gsm8k_test_prompts, llama31_8b_config

    dev = "cpu" if a.tiny else "cuda"
    tok = load_tokenizer(a.tokenizer)
    prompts = gsm8k_test_prompts(tok, a.data_dir, a.prompts)
    model = build(llama31_8b_config(layers=a.layers, tiny=a.tiny), dev)
    model.config._attn_implementation = "sdpa"
    batch = a.batch or auto_batch_size(model, len(prompts), "generate", 300 + a.new)
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "prompts": len(prompts), "max_new_tokens": a.new, "batch": batch, "rows": []}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    generate_all(model, tok, prompts[:4], 4, batch_size=4)   # CUDA context and library handles, before any row
    for cfg in a.configs.split(","):
        attn, backend = cfg.split("/")
        os.environ["ACF_GQA_FOLD"] = "1" if attn == "fold" else "0"
        os.environ["ACF_GEN_CUDNN_SDPA"] = "1" if backend == "cudnn" else "0"   # acf's engine excludes it unless 1
        for call in ("first", "second"):
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            outs, how = generate_all(model, tok, prompts, a.new, batch_size=batch)
            if dev == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t
            n = sum(k for _, k in outs)
            row = {"attention": attn, "sdpa_backends": "cuDNN allowed" if backend == "cudnn" else "cuDNN disabled",
                   "call": call, "engine": how, "seconds": round(secs, 2), "generated_tokens": n,
                   "tokens_per_s": round(n / secs, 1),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "gen-backends.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
