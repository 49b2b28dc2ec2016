"""Fidelity of fixed recipes on the default model: how much each damages the model it came from, and how much of
an answer-NLL "gain" is task adaptation.

    .venv/bin/python experiments/bench_fidelity.py --limit 40 --acc-limit 0 --csqa-limit 100     # CPU table
    python3 experiments/bench_fidelity.py --device cuda --limit 400 --acc-limit 1319 --csqa-limit 1221

Per configuration: size on disk, answer NLL, kld, top1 (on `--limit` GSM8K test items), kld_general (the other
tasks' test text), GSM8K accuracy (`--acc-limit` items, greedy generation) and CommonsenseQA accuracy
(`--csqa-limit` items, log-likelihood of the choices), each with n and a 95% interval; and the time of kld alone
vs answer NLL alone on the same items, the exact KL (full vocabulary, baseline resident) beside the cached
top-k + tail estimate. LoRA / distillation train on GSM8K train: their rows mix task adaptation with compression,
and "lora50 alone" / "distill50 alone" are the controls that show how much.

Writes experiments/results/fidelity-<device>.json and .md after every configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
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


def configs(calib: int, awq_calib: int, steps: int) -> dict[str, list[dict]]:
    c = {"calib_samples": calib, "seq_len": 512}
    g = {"bits": 4, "group_size": 64}
    gptq = {"method": "gptq", "params": {**g, **c}}
    gptq_ao = {"method": "gptq", "params": {**g, "act_order": True, **c}}
    lora = {"method": "lora", "params": {"steps": steps}}
    distill = {"method": "distill", "params": {"steps": steps}}
    drop1 = {"method": "drop_layers", "params": {"count": 1, "by": "importance", **c}}
    return {
        "gptq_w4g64": [gptq],
        "gptq_w4g64_actorder": [gptq_ao],
        "awq_w4g64": [{"method": "awq", "params": {**g, "calib_samples": awq_calib, "seq_len": 512}}],
        "w8a8": [{"method": "w8a8", "params": dict(c)}],
        f"lora{steps}_alone": [lora],
        f"distill{steps}_alone": [distill],
        f"lora{steps}+gptq_w4": [lora, gptq_ao],
        f"distill{steps}+gptq_w4": [distill, gptq_ao],
        f"drop1+lora{steps}+gptq_w4": [drop1, lora, gptq_ao],
        f"drop1+distill{steps}+gptq_w4": [drop1, distill, gptq_ao],
    }


def exact_kld(base, cand, seqs, batch: int = 8) -> float:
    """KL(baseline || candidate) over the full vocabulary, both models resident (no cache, no approximation)."""
    import torch

    from acf.evaluation.fidelity import _forward_rows

    pad = 0
    # _forward_rows yields each row's scored positions in chunks (bounded memory), in position order; both models
    # see the same sequences, batches and vocabulary, so their chunks pair up in order
    rows_b: dict[int, list] = {}
    for i, _s, _off, lg in _forward_rows(base, seqs, batch, pad):
        rows_b.setdefault(i, []).append(lg)
    tot = 0.0
    for i, _s, _off, lq in _forward_rows(cand, seqs, batch, pad):
        lp = torch.log_softmax(rows_b[i].pop(0), -1)
        lq = torch.log_softmax(lq, -1)
        tot += float((lp.exp() * (lp - lq)).sum())
    return tot / max(sum(len(s.target) for s in seqs), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all")
    ap.add_argument("--limit", type=int, default=400, help="GSM8K test items for answer NLL / kld / top1")
    ap.add_argument("--acc-limit", type=int, default=1319, help="GSM8K items for generation accuracy (0: skip)")
    ap.add_argument("--csqa-limit", type=int, default=1221, help="CommonsenseQA items (0: skip)")
    ap.add_argument("--acc-batch", type=int, default=None, help="generation batch for GSM8K accuracy (default: "
                    "from free memory). On a GPU a small model's generation costs per decode step, not per row, so "
                    "all 1319 items in one batch take about as long as 400")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--awq-calib-samples", type=int, default=None)
    ap.add_argument("--steps", type=int, default=50, help="LoRA / distillation steps")
    ap.add_argument("--exact-limit", type=int, default=None, help="items for the exact-KL check (default: --limit)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON and run only "
                                                          "the configs it lacks (a run split over several calls)")
    args = ap.parse_args()

    from acf.evaluation.runner import Loaded, build_fidelity, eval_items, evaluate
    from acf.evaluation.sequences import task_sequences
    from acf.methods.base import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import resolve_device, resolve_model
    from acf.core.provenance import device_string
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy
    from acf.tasks import get_task

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    awq_calib = args.awq_calib_samples or (args.calib_samples if cuda else min(args.calib_samples, 16))
    cfgs = configs(args.calib_samples, awq_calib, args.steps)
    names = list(cfgs) if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in cfgs]
    if bad:
        print(f"unknown config(s) {bad}; choose from {list(cfgs)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model_dir = resolve_model(args.model)
    spec = infer_spec(model_dir)
    gsm, csqa = get_task("gsm8k"), get_task("commonsenseqa")
    ctx = StepContext(device=device, task=gsm, teacher_dir=model_dir)
    items = eval_items(gsm, args.limit, 0)
    kind = "cuda" if cuda else "cpu"
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = outdir / f"fidelity-{kind}"
    import importlib.metadata as md

    vers = {p: _ver(md, p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors", "peft")}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows: list[dict] = []
    if args.resume and stem.with_suffix(".json").is_file():
        old = json.loads(stem.with_suffix(".json").read_text())
        rows = list(old.get("rows", []))   # every earlier row stays, --configs only chooses what runs now
        started = old.get("date", started)
        for r in rows:   # rows from before rows carried their own machine were all measured on the file's
            r.setdefault("device", old.get("device"))
            r.setdefault("measured", old.get("date"))
    done = {r["config"] for r in rows}

    def write(complete: bool) -> None:
        res = {"device": device_string(device), "device_kind": kind, "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "versions": vers, "model": str(model_dir), "date": started,
               "limit": args.limit, "acc_limit": args.acc_limit, "csqa_limit": args.csqa_limit,
               "calib_samples": args.calib_samples, "awq_calib_samples": awq_calib, "steps": args.steps,
               "complete": complete, "planned": names, "rows": rows}
        stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(_markdown(res))

    base = Loaded.load(model_dir, device)
    t = time.perf_counter()
    fid = build_fidelity(base.model, base.tokenizer, gsm, items, batch_size=None if cuda else 8,
                         model_name=str(model_dir))
    ref_s = time.perf_counter() - t
    seqs = task_sequences(gsm, base.tokenizer, items)
    exact_seqs = seqs[: args.exact_limit or len(seqs)]

    def measure(path: Path, loaded: Loaded, name: str) -> dict:
        bs = None if cuda else 8
        r = evaluate(path, gsm, ["kld", "top1", "kld_general", "answer_nll", "size", "params", "bits_per_weight"],
                     limit=args.limit, device=device, loaded=loaded, fidelity=fid, batch_size=bs, show_progress=False)
        row = {k: m.model_dump() for k, m in r.metrics.items()}
        # timing: kld alone vs answer NLL alone, same items, same load (after the pass above warmed everything)
        t0 = time.perf_counter()
        evaluate(path, gsm, ["answer_nll"], limit=args.limit, device=device, loaded=loaded, batch_size=bs,
                 show_progress=False)
        t_nll = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate(path, gsm, ["kld"], limit=args.limit, device=device, loaded=loaded, fidelity=fid, batch_size=bs,
                 show_progress=False)
        t_kld = time.perf_counter() - t0
        row["timing"] = {"answer_nll_s": round(t_nll, 3), "kld_s": round(t_kld, 3),
                         "ratio": round(t_kld / t_nll, 3) if t_nll else None}
        if name != "baseline":
            t0 = time.perf_counter()
            row["kld_exact"] = {"value": exact_kld(base.model, loaded.model, exact_seqs), "n": len(exact_seqs),
                                "seconds": round(time.perf_counter() - t0, 2)}
        if args.acc_limit:
            row["gsm8k_accuracy"] = evaluate(path, gsm, ["accuracy"], limit=args.acc_limit, device=device,
                                             loaded=loaded, batch_size=args.acc_batch or (None if cuda else 8),
                                             show_progress=False).metrics["accuracy"].model_dump()
        if args.csqa_limit:
            row["csqa_accuracy"] = evaluate(path, csqa, ["accuracy"], limit=args.csqa_limit, device=device,
                                            loaded=loaded, batch_size=None if cuda else 8,
                                            show_progress=False).metrics["accuracy"].model_dump()
        return row

    work = Path(tempfile.mkdtemp(prefix="acf-fid-"))
    try:
        if "baseline" not in done:
            brow = measure(model_dir, base, "baseline")
            brow.update(config="baseline", status="ok", strategy="baseline (no compression)", wall_seconds=0.0,
                        reference_seconds=round(ref_s, 2), device=device_string(device),
                        measured=time.strftime("%Y-%m-%d %H:%M:%S"))
            rows.insert(0, brow)
            _print(brow)
            write(False)
        for name in names:
            if name in done:
                continue
            strat = validate_strategy({"steps": cfgs[name]}, spec, device)
            out = work / name.replace("+", "_")
            t = time.perf_counter()
            recs = run_strategy(strat, model_dir, out, ctx)
            row = {"config": name, "strategy": strat.describe(), "wall_seconds": round(time.perf_counter() - t, 1),
                   "steps": [r.model_dump() for r in recs], "device": device_string(device),
                   "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
            if recs and all(r.status == "ok" for r in recs):
                ld = Loaded.load(out, device)
                try:
                    row.update(status="ok", **measure(out, ld, name))
                finally:
                    ld.free()
                shutil.rmtree(out, ignore_errors=True)
            else:
                row.update(status="failed", reason=recs[-1].reason if recs else "no step ran")
            rows.append(row)
            _print(row)
            write(False)
        write(True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {stem}.json and .md")
    return 0


def _ver(md, p: str) -> str:
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "not installed"


def _v(row: dict, k: str):
    m = row.get(k) or {}
    return m.get("value")


def _print(row: dict) -> None:
    if row["status"] != "ok":
        print(f"{row['config']:<28} FAILED {row.get('reason')}", flush=True)
        return
    acc = row.get("gsm8k_accuracy", {}).get("value")
    cs = row.get("csqa_accuracy", {}).get("value")
    print(f"{row['config']:<28} {_v(row, 'size') / 2**20:7.1f} MiB  nll {_v(row, 'answer_nll'):.4f}  "
          f"kld {_v(row, 'kld'):.4f}  top1 {_v(row, 'top1'):.3f}  kld_gen {_v(row, 'kld_general') or 0:.4f}  "
          f"acc {acc if acc is None else round(acc, 3)}  csqa {cs if cs is None else round(cs, 3)}  "
          f"t(kld)/t(nll) {row['timing']['ratio']}", flush=True)


def _ci(m: dict, fmt: str = "{:.4f}") -> str:
    if not m or m.get("value") is None:
        return "-"
    s = fmt.format(m["value"])
    if m.get("ci95"):
        s += " [" + ", ".join(fmt.format(x) for x in m["ci95"]) + "]"
    return s


def _markdown(res: dict) -> str:
    rows = res["rows"]
    base = rows[0] if rows else {}
    # a resumed table may hold rows of several machines: then each row names its own
    machines = list(dict.fromkeys(r.get("device") or res["device"] for r in rows))
    per_row = len(machines) > 1
    where = ", ".join(machines) if per_row else res["device"]
    lines = [f"# Fidelity of fixed recipes on {Path(res['model']).name} ({where})"
             + ("" if res["complete"] else " — INCOMPLETE"), "",
             f"Date {res['date']}. GSM8K test items: {res['limit']} for answer NLL / kld / top1 (the first of acf's "
             f"seed-0 permutation), {res['acc_limit']} for accuracy (greedy, zero-shot chat); CommonsenseQA "
             f"{res['csqa_limit']} items; kld_general on 24 test items each of TruthfulQA, HumanEval and "
             f"CommonsenseQA. Calibration: {res['calib_samples']} x 512 tokens of GSM8K train in the chat format "
             f"evaluation uses (AWQ {res['awq_calib_samples']}); LoRA/distill {res['steps']} steps on GSM8K train. "
             "Intervals are 95% (kld/top1/NLL: items as clusters; accuracy: Wilson).", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), "",
             "| config | size MiB | answer NLL | kld | kld p99 | top1 | kld_general | GSM8K acc | CSQA acc | "
             "exact KL | t(kld)/t(nll) |" + (" measured on |" if per_row else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if per_row else "")]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['config']} | failed: {r.get('reason', '')} |||||||||")
            continue
        k = r.get("kld", {})
        p99 = (k.get("extra") or {}).get("p99")
        ex = r.get("kld_exact", {}).get("value")
        lines.append(
            f"| {r['config']} | {_v(r, 'size') / 2**20:.1f} | {_ci(r.get('answer_nll'))} | {_ci(k)} | "
            f"{'-' if p99 is None else f'{p99:.3f}'} | {_ci(r.get('top1'), '{:.3f}')} | {_ci(r.get('kld_general'))} | "
            f"{_ci(r.get('gsm8k_accuracy'), '{:.3f}')} | {_ci(r.get('csqa_accuracy'), '{:.3f}')} | "
            f"{'-' if ex is None else f'{ex:.4f}'} | {r['timing']['ratio']} |"
            + (f" {r.get('device') or res['device']}, {str(r.get('measured') or res['date'])[:10]} |" if per_row else ""))
    if base:
        lines += ["", f"Baseline reference (top-128 + tail of the uncompressed model) built in "
                      f"{base.get('reference_seconds')} s."]
    lines += ["", "Reading it:",
              "- kld / top1 measure damage against the uncompressed model; answer NLL can fall below the baseline's "
              "when a step trains on GSM8K train (task adaptation): compare the `*_alone` controls.",
              "- exact KL: full-vocabulary KL with the baseline resident, on the same items; the cached top-128 + tail "
              "figure is a lower bound of it.",
              "- t(kld)/t(nll): wall time of kld alone over answer NLL alone, same items and load; in a run both "
              "come from one pass."]
    if per_row:
        lines.append("- rows of different machines were measured in separate processes, each with its own baseline "
                     "reference built there.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
