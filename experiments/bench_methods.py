"""Benchmark the compression methods on the default model: wall time, size on disk, answer NLL vs the baseline.

    .venv/bin/python experiments/bench_methods.py --limit 100                 # everything
    .venv/bin/python experiments/bench_methods.py --methods rtn,gptq --limit 20

Writes experiments/results/methods-<device>.json and .md (device, library versions, every step record).
Answer NLL: mean NLL per reference-solution token on the first `--limit` GSM8K test items (same items for all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def configs(calib: int, awq_calib: int) -> dict[str, list[dict]]:
    c = {"calib_samples": calib, "seq_len": 512}
    drop4 = {"method": "drop_layers", "params": {"count": 4, "by": "importance", "calib_samples": min(calib, 32),
                                                 "seq_len": 512}}
    return {
        "rtn_w4g64": [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}],
        "gptq_w4g64": [{"method": "gptq", "params": {"bits": 4, "group_size": 64, **c}}],
        "awq_w4g64": [{"method": "awq", "params": {"bits": 4, "group_size": 64, "calib_samples": awq_calib,
                                                   "seq_len": 512}}],
        "w8a8": [{"method": "w8a8", "params": {**c}}],
        "sparsegpt_50": [{"method": "sparsegpt", "params": {"sparsity": 0.5, **c}}],
        "wanda_50": [{"method": "wanda", "params": {"sparsity": 0.5, **c}}],
        "magnitude_50": [{"method": "magnitude", "params": {"sparsity": 0.5}}],
        "sparsegpt_2:4": [{"method": "sparsegpt", "params": {"sparsity": 0.5, "pattern": "2:4", **c}}],
        "drop4_importance": [drop4],
        "drop4_first": [{"method": "drop_layers", "params": {"count": 4, "by": "first"}}],
        "drop4+lora50": [drop4, {"method": "lora", "params": {"steps": 50, "lr": 2e-4, "rank": 16, "alpha": 32,
                                                              "batch_size": 4, "seq_len": 256, "samples": 256}}],
        "drop4+distill50": [drop4, {"method": "distill", "params": {"steps": 50, "lr": 5e-5, "batch_size": 4,
                                                                    "seq_len": 256, "samples": 256}}],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma-separated config names (see --list) or 'all'")
    ap.add_argument("--limit", type=int, default=100, help="GSM8K test items for answer NLL")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration samples (512 tokens) per method")
    ap.add_argument("--awq-calib-samples", type=int, default=None,
                    help="AWQ calibration samples (AWQ's grid search is slow on CPU; default: calib-samples on "
                         "CUDA, min(calib-samples, 16) on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()

    import torch

    from acf.evaluation import evaluate
    from acf.methods.base import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import resolve_device, resolve_model
    from acf.core.provenance import device_string
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec
    from acf.tasks import get_task

    device = resolve_device(args.device)
    awq_calib = args.awq_calib_samples or (args.calib_samples if device.startswith("cuda")
                                           else min(args.calib_samples, 16))
    cfgs = configs(args.calib_samples, awq_calib)
    if args.list:
        print("\n".join(cfgs))
        return 0
    names = list(cfgs) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [n for n in names if n not in cfgs]
    if bad:
        print(f"unknown config(s) {bad}; choose from {list(cfgs)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    import signal

    # a `kill` should still remove the temporary model dirs (the finally block below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model_dir = resolve_model(args.model)
    spec = infer_spec(model_dir)
    task = get_task("gsm8k")
    ctx = StepContext(device=device, task=task, teacher_dir=model_dir)
    work = Path(tempfile.mkdtemp(prefix="acf-bench-"))
    rows = []

    def measure(path: Path) -> dict:
        r = evaluate(path, task, ["answer_nll", "size"], limit=args.limit, device=device, show_progress=False)
        return {"answer_nll": r.value("answer_nll"), "size_bytes": int(r.value("size"))}

    import importlib.metadata as md

    vers = {p: _ver(md, p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors", "peft",
                                     "bitsandbytes", "auto-round")}
    kind = "cuda" if device.startswith("cuda") else "cpu"
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"methods-{kind}{'' if args.methods == 'all' else '-subset'}"
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def write(complete: bool) -> None:
        result = {"device": device_string(device), "device_kind": kind, "host": platform.node(),
                  "cpu_count": os.cpu_count(), "python": platform.python_version(), "versions": vers,
                  "model": str(model_dir), "task": "gsm8k", "limit": args.limit, "calib_samples": args.calib_samples,
                  "awq_calib_samples": awq_calib, "date": started, "complete": complete,
                  "planned": names, "rows": rows,
                  "notes": ["answer_nll: mean NLL per reference token on the first `limit` GSM8K test items",
                            "wall_seconds: the whole strategy incl. model load/save, not just the algorithm",
                            "weight-sparse models are saved dense (compressed-tensors 0.19 has no sparse format): "
                            "their size does not shrink",
                            f"AWQ used {awq_calib} calibration samples (its grid search is slow on CPU)"]
                            + sorted({f"{s['method']} trained in {s['extra']['precision']}" for r in rows
                                      for s in r.get("steps", []) if s.get("extra", {}).get("precision")})
                            + ([] if complete else ["INCOMPLETE: the run stopped before every planned config ran"])}
        (stem.with_suffix(".json")).write_text(json.dumps(result, indent=2, default=str) + "\n")
        (stem.with_suffix(".md")).write_text(_markdown(result, rows[0]))

    t = time.perf_counter()
    base = measure(model_dir)
    base_eval_s = time.perf_counter() - t
    print(f"baseline: answer_nll {base['answer_nll']:.4f}  size {base['size_bytes'] / 1e6:.1f} MB "
          f"(eval {base_eval_s:.0f}s)", flush=True)
    rows.append({"config": "baseline", "status": "ok", "wall_seconds": 0.0, **base, "steps": []})
    write(complete=False)
    try:
        for name in names:
            strat = validate_strategy({"steps": cfgs[name]}, spec, device)
            out = work / name.replace(":", "-").replace("+", "_")
            t = time.perf_counter()
            recs = run_strategy(strat, model_dir, out, ctx)
            wall = time.perf_counter() - t
            row = {"config": name, "strategy": strat.describe(), "wall_seconds": round(wall, 1),
                   "steps": [r.model_dump() for r in recs]}
            if recs and all(r.status == "ok" for r in recs):
                row.update(status="ok", **measure(out))
                shutil.rmtree(out, ignore_errors=True)
            else:
                row.update(status="failed", reason=recs[-1].reason if recs else "no step ran")
            rows.append(row)
            _print_row(row, base)
            write(complete=False)
        write(complete=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {stem}.json and .md")
    return 0


def _ver(md, p: str) -> str:
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "not installed"


def _print_row(row: dict, base: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['config']:<18} FAILED {row.get('reason')}", flush=True)
        return
    d = row["answer_nll"] - base["answer_nll"]
    print(f"{row['config']:<18} {row['wall_seconds']:>7.1f}s  {row['size_bytes'] / 1e6:>7.1f} MB "
          f"({row['size_bytes'] / base['size_bytes']:.2f}x)  nll {row['answer_nll']:.4f} ({d:+.4f})", flush=True)


def _markdown(result: dict, base: dict) -> str:
    lines = [f"# Compression methods on {Path(result['model']).name} ({result['device']})"
             + ("" if result.get("complete", True) else " — INCOMPLETE RUN"), "",
             f"Date {result['date']}; {result['cpu_count']} CPUs; answer NLL on {result['limit']} GSM8K test items; "
             f"{result['calib_samples']} calibration samples x 512 tokens (AWQ {result['awq_calib_samples']}).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
             "| config | status | wall s | size MB | size vs base | answer NLL | ΔNLL | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        if r["status"] == "ok":
            note = ""
            for s in r.get("steps", []):
                ex = s.get("extra", {})
                if "dropped_layers" in ex:
                    note += f"dropped {ex['dropped_layers']}; "
                if "measured_sparsity" in ex:
                    note += f"sparsity {ex['measured_sparsity']:.2f}; "
                if "loss_curve" in ex:
                    note += f"{s['method']} loss {ex['loss_first5_mean']:.3f}->{ex['loss_last5_mean']:.3f}; "
            lines.append(f"| {r['config']} | ok | {r['wall_seconds']:.1f} | {r['size_bytes'] / 1e6:.1f} | "
                         f"{r['size_bytes'] / base['size_bytes']:.2f} | {r['answer_nll']:.4f} | "
                         f"{r['answer_nll'] - base['answer_nll']:+.4f} | {note.strip('; ')} |")
        else:
            lines.append(f"| {r['config']} | failed | {r['wall_seconds']:.1f} | | | | | {r.get('reason', '')} |")
    lines += ["", "Notes:"] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
