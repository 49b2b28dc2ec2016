#!/usr/bin/env python3
"""Peak memory of the Fisher sensitivity pass (mixed precision, `avg_bits`) beside preflight's estimate of it.

Runs acf.methods.mixed.fisher_sensitivity on the default model as a compressed-tensors step does (its calibration
windows, the default palette) and reports the pass's peak above the loaded model: on a GPU
`torch.cuda.max_memory_allocated`, on the CPU the process's peak RSS (ru_maxrss) above its RSS before the pass
(the load's own transient peak is printed too: if it was higher, the CPU figure is a lower bound). The estimate is
acf.methods.memory.sensitivity_pass without its weights part (the model is already loaded).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fisher-memory-cpu.json"))
    a = ap.parse_args()
    from acf.methods.model_io import load_dense
    from acf.methods.calibration import calibration_ids
    from acf.methods.memory import GiB, Shape
    from acf.methods.mixed import fisher_sensitivity, shapes_of
    from acf.methods.mixed_step import palette
    from acf.methods.registry import estimate_step_memory
    from acf.models.loading import resolve_model
    from acf.models.spec import infer_spec
    from acf.tasks import get_task

    src = resolve_model("smollm2-135m")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model, tok = load_dense(src, a.device, "bench", dtype=dtype)
    task = get_task("gsm8k")
    ids = calibration_ids(tok, task, a.samples, a.seq_len, 0, "gptq")
    formats = palette({"target": "transformers"}, shapes_of(model))   # the palette its recorded runs used
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = rss_bytes()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fisher_sensitivity(model, ids, formats)
    secs = time.perf_counter() - t
    if a.device.startswith("cuda"):
        measured, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated above the model"
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        how = "peak RSS (ru_maxrss) above RSS before the pass"
    est = estimate_step_memory("gptq", {"avg_bits": 4.25, "sensitivity_samples": a.samples,
                                        "sensitivity_seq_len": a.seq_len}, Shape.of(infer_spec(src)), a.device)
    pass_est = est.total - est.parts["weights"]
    res = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
           "model": "smollm2-135m", "dtype": str(dtype), "windows": f"{a.samples} x {a.seq_len}",
           "seconds": round(secs, 1),
           "measured_bytes": measured, "measured_how": how, "estimate_bytes": pass_est,
           "estimate": est.describe(), "estimate_over_measured": round(pass_est / measured, 3),
           "rss_before_pass": before, "peak_rss_during_load": peak_load}
    print(json.dumps(res, indent=1))
    print(f"Fisher pass: measured {measured / GiB:.2f} GiB, estimated {pass_est / GiB:.2f} GiB "
          f"({pass_est / measured:.2f}x); {secs:.0f} s")
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
