"""Per-layer mixed precision on the default model: does spending bits where the model is sensitive beat uniform
quantization at the same size, and does the Fisher estimate rank layers like their measured damage?

    .venv/bin/python experiments/bench_mixed.py --limit 100 --calib-samples 16            # CPU
    python3 experiments/bench_mixed.py --device cuda --limit 400 --calib-samples 64

Part 1 (sensitivity): the Fisher estimate (acf.methods.mixed.fisher_sensitivity) for every Linear layer vs the
directly measured KL increase when only that layer is RTN-quantized (`direct_sensitivity`), Spearman's rank
correlation, and the cost of each in seconds.
Part 2 (curve): size, kld, top1, kld_general, answer NLL on `--limit` GSM8K test items (the first of acf's seed-0
permutation) of uniform GPTQ W4 g64 (plain, act-order), W4 g32, W8 and of mixed allocations at 4.25, 4.5, 5.0 and
6.0 effective bits, all GPTQ with act-order, calibrated on GSM8K train; RTN uniform vs mixed at 4.25 as a control
of the allocation without GPTQ; llama.cpp's Q4_K_M / Q5_K_M with an importance matrix against acf's per-tensor GGUF
allocation (token embedding included) at their sizes and at GPTQ W4 g64's, measured in llama.cpp (CPU only: the
GPU image has no llama-cpp-python). Writes experiments/results/mixed-<device>.json and .md after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


NO_Q51 = ["Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q5_0", "Q8_0", "F16"]


def configs(calib: int) -> dict[str, list[dict]]:
    c = {"calib_samples": calib, "seq_len": 512}
    ao = {"act_order": True, **c}

    def mixed(b):
        return [{"method": "gptq", "params": {"avg_bits": b, **ao}}]

    def kd(steps, **kw):
        return {"method": "kd_tune", "params": {"steps": steps, **kw}}

    return {
        "gptq_w4g64": [{"method": "gptq", "params": {"bits": 4, "group_size": 64, **c}}],
        "gptq_w4g64_ao": [{"method": "gptq", "params": {"bits": 4, "group_size": 64, **ao}}],
        "mixed_4.25_ao": mixed(4.25),
        "mixed_4.5_ao": mixed(4.5),
        "gptq_w4g32_ao": [{"method": "gptq", "params": {"bits": 4, "group_size": 32, **ao}}],
        "mixed_5.0_ao": mixed(5.0),
        "mixed_6.0_ao": mixed(6.0),
        "gptq_w8_ao": [{"method": "gptq", "params": {"bits": 8, "group_size": None, **ao}}],
        "rtn_w4g64": [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}],
        # distillation after quantization into the 16-bit tensors (acf.methods.kd_tune): acf's allocation with it,
        # the fixed recipe given the same step (what the step alone buys), and its parts. The committed +kd rows
        # trained the embedding table too (embedding_lr 2e-5, the step's default then); `_norms` is today's default
        "mixed_4.25_ao+kd100": mixed(4.25) + [kd(100, embedding_lr=2e-5)],
        "gptq_w4g64_ao+kd100": [{"method": "gptq", "params": {"bits": 4, "group_size": 64, **ao}},
                                kd(100, embedding_lr=2e-5)],
        "mixed_4.25_ao+kd300": mixed(4.25) + [kd(300, embedding_lr=2e-5)],
        "mixed_4.25_ao+kd100_norms": mixed(4.25) + [kd(100, embedding_lr=0.0)],
        "rtn_w4g64+kd100": [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}, kd(100, embedding_lr=2e-5)],
        "rtn_mixed_4.25": [{"method": "rtn", "params": {"avg_bits": 4.25}}],
        # llama.cpp (measured in llama.cpp): its mixes with an importance matrix, and per-tensor allocations (token
        # embedding included) at exactly their sizes and at uniform GPTQ W4 g64's; avg_bits filled in at run time
        "gguf_q4km_imat": [{"method": "gguf", "params": {"type": "Q4_K_M", "imatrix": True, **c}}],
        "gguf_mixed@q4km": [{"method": "gguf", "params": {"avg_bits": "size_of:gguf_q4km_imat", "imatrix": True, **c}}],
        "gguf_q5km_imat": [{"method": "gguf", "params": {"type": "Q5_K_M", "imatrix": True, **c}}],
        "gguf_mixed@q5km": [{"method": "gguf", "params": {"avg_bits": "size_of:gguf_q5km_imat", "imatrix": True, **c}}],
        "gguf_mixed@w4g64": [{"method": "gguf", "params": {"avg_bits": "size_of:gptq_w4g64_ao", "imatrix": True, **c}}],
        # control: the default model's weights were dequantized from a Q4_1 GGUF, so Q5_1 (whose grid holds Q4_1's)
        # reproduces them almost exactly; without it in the palette, what is left is the allocation's own gain
        "gguf_mixed@q4km_noq51": [{"method": "gguf", "params": {"avg_bits": "size_of:gguf_q4km_imat", "imatrix": True,
                                                                "types": NO_Q51, **c}}],
    }


def gguf_bits_for(target_bytes: int, ref_gguf: Path) -> float:
    """avg_bits whose allocation makes a GGUF file of `target_bytes`: what is not an allocated matrix (metadata,
    tokenizer, norms) is the same in every GGUF of this model, read off a reference file (the Q4_K_M export)."""
    from acf.methods.gguf_mixed import _tensor_infos, allocatable, tensor_bytes
    from gguf.constants import GGMLQuantizationType

    shapes = {s.name: s for s in allocatable(ref_gguf)}
    infos, _ = _tensor_infos(ref_gguf)
    alloc = sum(tensor_bytes(GGMLQuantizationType(tt).name, shapes[n].rows, shapes[n].cols)
                for n, _, tt, _ in infos if n in shapes)
    fixed = ref_gguf.stat().st_size - alloc
    return round((target_bytes - fixed) * 8 / sum(s.numel for s in shapes.values()) - 0.0005, 3)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); by hand to keep scipy out of the dependencies."""
    import numpy as np

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):          # ties share their mean rank
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def sensitivity_part(model_dir: Path, device: str, task, samples: int, direct_windows: int, seq_len: int,
                     block_stride: int, formats_direct: list[str]) -> dict:
    import torch

    from acf.methods.model_io import load_dense
    from acf.methods.calibration import calibration_ids
    from acf.methods.mixed import direct_sensitivity, fisher_sensitivity, parse_format
    from acf.methods.mixed_step import palette
    from acf.methods.mixed import shapes_of

    model, tok = load_dense(model_dir, device, "bench", dtype=torch.float32 if device == "cpu" else None)
    # the estimator's agreement is measured on every format acf allocates, 3-bit included (target transformers)
    formats = palette({"target": "transformers"}, shapes_of(model, ["lm_head"]))
    ids = calibration_ids(tok, task, samples, seq_len, 0)
    t = time.perf_counter()
    est = fisher_sensitivity(model, ids, formats)
    t_fisher = time.perf_counter() - t
    # the direct measurement uses other windows (seed 1) than the estimate, so agreement is not shared noise
    dids = calibration_ids(tok, task, direct_windows, seq_len, 1)
    out = {"formats": formats, "fisher": {"samples": samples, "seq_len": seq_len, "seconds": round(t_fisher, 2)},
           "direct": {"windows": direct_windows, "seq_len": seq_len}, "by_format": {}}
    # every layer of every `block_stride`-th block (and the last block): the direct pass costs one forward per
    # layer, which on a shared 2-core CPU is ~10-25 s, so all 210 layers would take an hour or more
    n_blocks = 1 + max(int(n.split(".")[2]) for n in est if n.startswith("model.layers."))
    blocks = sorted(set(range(0, n_blocks, block_stride)) | {n_blocks - 1})
    names = [n for n in est if n.startswith("model.layers.") and int(n.split(".")[2]) in blocks]
    out["direct"]["blocks"] = blocks
    for fname in formats_direct:
        if fname not in formats:
            continue
        t = time.perf_counter()
        direct = direct_sensitivity(model, dids, names, parse_format(fname))
        secs = time.perf_counter() - t
        rho = spearman([est[n][fname] for n in names], [direct[n] for n in names])
        top = sorted(names, key=lambda n: -direct[n])[:8]
        out["by_format"][fname] = {"spearman": round(rho, 4), "layers": len(names), "direct_seconds": round(secs, 1),
                                   "top_direct": {n: {"direct": direct[n], "fisher": est[n][fname]} for n in top},
                                   "all": {n: {"direct": direct[n], "fisher": est[n][fname]} for n in names}}
        print(f"sensitivity {fname}: Spearman {rho:.3f} over {len(names)} layers (Fisher {t_fisher:.1f} s for all "
              f"formats, direct {secs:.1f} s for this one)", flush=True)
    del model
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all")
    ap.add_argument("--limit", type=int, default=100, help="GSM8K test items for kld / top1 / answer NLL")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--sens-samples", type=int, default=16)
    ap.add_argument("--direct-windows", type=int, default=4)
    ap.add_argument("--block-stride", type=int, default=5, help="direct pass on every layer of every Nth block")
    ap.add_argument("--direct-formats", default="w4g64", help="formats of the direct pass (comma list)")
    ap.add_argument("--skip-sensitivity", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--resume", action="store_true", help="keep rows already written, run only the missing ones")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes (provenance)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json (with --note)")
    args = ap.parse_args()

    from acf.evaluation.runner import Loaded, build_fidelity, eval_items, evaluate
    from acf.methods.base import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import resolve_device, resolve_model
    from acf.core.provenance import device_string
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy
    from acf.tasks import get_task

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    cfgs = configs(args.calib_samples)
    names = list(cfgs) if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
    if [n for n in names if n not in cfgs]:
        print(f"unknown config(s); choose from {list(cfgs)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model_dir = resolve_model(args.model)
    spec = infer_spec(model_dir)
    gsm = get_task("gsm8k")
    ctx = StepContext(device=device, task=gsm, teacher_dir=model_dir)
    kind = "cuda" if cuda else "cpu"
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"mixed-{kind}"
    import importlib.metadata as md

    res: dict = {"device": device_string(device), "device_kind": kind, "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "model": str(model_dir), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "limit": args.limit, "calib_samples": args.calib_samples,
                 "versions": {p: md.version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")},
                 "rows": [], "sensitivity": None, "complete": False}
    if (args.resume or args.render) and stem.with_suffix(".json").is_file():
        old = json.loads(stem.with_suffix(".json").read_text())
        res["rows"], res["sensitivity"] = old.get("rows", []), old.get("sensitivity")
        res["notes"] = old.get("notes", [])
        if args.render:
            res.update({k: old[k] for k in ("date", "device", "limit", "calib_samples", "versions", "complete")
                        if k in old})
    res["notes"] = list(res.get("notes") or []) + list(args.note)

    def write() -> None:
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(_markdown(res))

    if args.render:
        write()
        return 0
    if not args.skip_sensitivity and not res["sensitivity"]:
        res["sensitivity"] = sensitivity_part(model_dir, device, gsm, args.sens_samples, args.direct_windows, 256,
                                              args.block_stride, args.direct_formats.split(","))
        write()
    done = {r["config"] for r in res["rows"]}
    items = eval_items(gsm, args.limit, 0)
    base = Loaded.load(model_dir, device)
    fid = build_fidelity(base.model, base.tokenizer, gsm, items, batch_size=None if cuda else 8,
                         model_name=str(model_dir))
    metrics = ["kld", "top1", "kld_general", "answer_nll", "size", "bits_per_weight"]

    def measure(path: Path, loaded) -> dict:
        r = evaluate(path, gsm, metrics, limit=args.limit, device=device, loaded=loaded, fidelity=fid,
                     batch_size=None if cuda else 8, show_progress=False)
        return {k: m.model_dump() for k, m in r.metrics.items()}

    if "baseline" not in done:
        res["rows"].insert(0, {"config": "baseline", "status": "ok", **measure(model_dir, base)})
        write()
    base.free()
    work = Path(tempfile.mkdtemp(prefix="acf-mixed-"))
    try:
        for name in names:
            if name in done:
                continue
            steps = json.loads(json.dumps(cfgs[name]))
            for st in steps:
                ab = st["params"].get("avg_bits")
                if isinstance(ab, str) and ab.startswith("size_of:"):
                    ref = next((r for r in res["rows"] if r["config"] == ab[8:] and r["status"] == "ok"), None)
                    q4 = next((r for r in res["rows"] if r["config"] == "gguf_q4km_imat" and r.get("gguf_file")), None)
                    if ref is None or q4 is None or not Path(q4["gguf_file"]).is_file():
                        print(f"{name}: needs rows {ab[8:]} and gguf_q4km_imat (with its file) first", flush=True)
                        st["params"]["avg_bits"] = None
                        break
                    st["params"]["avg_bits"] = gguf_bits_for(int(_v(ref, "size")), Path(q4["gguf_file"]))
            if any(st["params"].get("avg_bits", 0) is None for st in steps):
                continue
            strat = validate_strategy({"steps": steps}, spec, device)
            out = work / name
            t = time.perf_counter()
            recs = run_strategy(strat, model_dir, out, ctx)
            row: dict = {"config": name, "strategy": strat.describe(), "wall_seconds": round(time.perf_counter() - t, 1)}
            mp = next((r.extra["mixed_precision"] for r in recs if r.extra.get("mixed_precision")), None)
            kd = next((r for r in recs if r.method == "kd_tune" and r.status == "ok"), None)
            if kd is not None:
                row["kd_tune"] = {k: kd.extra.get(k) for k in ("loss_first5_mean", "loss_last5_mean", "trained_params",
                                                               "trained_tensors")}
                row["kd_tune"]["wall_seconds"] = kd.wall_seconds
            if mp:
                row["mixed"] = {k: mp.get(k) for k in ("sensitivity", "predicted_weight_file_bytes",
                                                        "measured_weight_file_bytes", "predicted_file_bytes",
                                                        "measured_file_bytes", "size_prediction_error")}
                row["mixed"]["counts"] = mp["allocation"]["counts"]
                row["mixed"]["effective_bits"] = mp["allocation"]["effective_bits"]
                row["mixed"]["budget_bits"] = mp["allocation"]["budget_bits"]
                row["mixed"]["layer_formats"] = (mp["allocation"].get("layer_formats")
                                                 or mp["allocation"].get("tensor_types"))
            gguf = any(st["method"] == "gguf" for st in steps)
            if recs and all(r.status == "ok" for r in recs):
                ld = None if gguf else Loaded.load(out, device)   # a GGUF is measured in llama.cpp
                try:
                    row.update(status="ok", **measure(out, ld))
                finally:
                    if ld is not None:
                        ld.free()
                if gguf and name == "gguf_q4km_imat":           # kept: later rows size themselves off it
                    from acf.models.loading import cache_dir

                    keep = cache_dir() / "bench" / "mixed-q4km.gguf"      # ~100 MB: outside the repository
                    keep.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(out / "model.gguf", keep)
                    row["gguf_file"] = str(keep)
            else:
                row.update(status="failed", reason=recs[-1].reason if recs else "no step ran")
            shutil.rmtree(out, ignore_errors=True)
            res["rows"].append(row)
            _print(row)
            write()
        res["complete"] = True
        write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {stem}.json and .md")
    return 0


def _v(row: dict, k: str):
    return (row.get(k) or {}).get("value")


def _print(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['config']:<18} FAILED {row.get('reason')}", flush=True)
        return
    print(f"{row['config']:<18} {_v(row, 'size') / 2**20:7.2f} MiB  kld {_v(row, 'kld'):.4f}  top1 "
          f"{_v(row, 'top1'):.3f}  nll {_v(row, 'answer_nll'):.4f}  ({row['wall_seconds']} s)", flush=True)


def _ci(m: dict, fmt: str = "{:.4f}") -> str:
    if not m or m.get("value") is None:
        return "-"
    s = fmt.format(m["value"])
    return s + (" [" + ", ".join(fmt.format(x) for x in m["ci95"]) + "]" if m.get("ci95") else "")


def _markdown(res: dict) -> str:
    lines = [f"# Per-layer mixed precision on {Path(res['model']).name} ({res['device']})"
             + ("" if res["complete"] else " — INCOMPLETE"), "",
             f"Date {res['date']}. {res['limit']} GSM8K test items (acf's seed-0 permutation) for kld / top1 / answer "
             f"NLL; kld_general on 24 test items each of TruthfulQA, HumanEval and CommonsenseQA. GPTQ calibration "
             f"{res['calib_samples']} x 512 tokens of GSM8K train (evaluation's chat format). Intervals 95% (items as "
             "clusters). Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    s = res.get("sensitivity")
    if s:
        lines += ["## Sensitivity estimate vs measured per-layer damage", "",
                  f"Fisher estimate (sampled-label Fisher diagonal x RTN error, {s['fisher']['samples']} windows x "
                  f"{s['fisher']['seq_len']} tokens of GSM8K train): {s['fisher']['seconds']} s for every layer and "
                  f"format ({', '.join(s['formats'])}). Direct: KL(baseline || model with only that layer RTN-quantized), "
                  f"{s['direct']['windows']} other windows x {s['direct']['seq_len']} tokens, every layer of blocks "
                  f"{s['direct'].get('blocks')}.", "",
                  "| format | layers | Spearman (Fisher vs direct) | direct pass s |", "|---|---:|---:|---:|"]
        for f, d in s["by_format"].items():
            lines.append(f"| {f} | {d['layers']} | {d['spearman']:.3f} | {d['direct_seconds']} |")
        for f, d in s["by_format"].items():
            lines += ["", f"Most damaging layers at {f} (direct KL, Fisher estimate):", ""]
            lines += [f"- {n}: {v['direct']:.5f} / {v['fisher']:.5f}" for n, v in d["top_direct"].items()]
        lines.append("")
    lines += ["## Quality vs size", "",
              "| config | size MiB | eff. bits | kld | top1 | kld_general | answer NLL | formats | size pred. err | runtime | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in res["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | failed: {r.get('reason', '')} ||||||||||")
            continue
        mx = r.get("mixed") or {}
        counts = ", ".join(f"{k} {v}" for k, v in sorted((mx.get("counts") or {}).items()))
        err = mx.get("size_prediction_error")
        lines.append(f"| {r['config']} | {_v(r, 'size') / 2**20:.2f} | {mx.get('effective_bits', '-')} | "
                     f"{_ci(r.get('kld'))} | {_ci(r.get('top1'), '{:.3f}')} | {_ci(r.get('kld_general'))} | "
                     f"{_ci(r.get('answer_nll'))} | {counts or '-'} | {'-' if err is None else f'{100 * err:+.2f}%'} | "
                     f"{(r.get('kld') or {}).get('runtime') or '-'} | {r.get('wall_seconds', 0)} |")
    kd = [r for r in res["rows"] if r.get("kd_tune")]
    if kd:
        lines += ["", "`+kdN`: N steps of `kd_tune` after the quantization (batch 4 x 256 GSM8K-train tokens; KL to the "
                  "uncompressed model, quantized weights frozen; `_norms`: the embedding table frozen too). Same file "
                  "size; the KL of the training batches, mean of the first and last 5 steps:", ""]
        lines += [f"- {r['config']}: {r['kd_tune']['loss_first5_mean']} -> {r['kd_tune']['loss_last5_mean']} "
                  f"({r['kd_tune']['trained_params']:,} parameters trained, {r['kd_tune']['wall_seconds']} s)"
                  for r in kd]
    if res.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
