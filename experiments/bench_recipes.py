"""The yardstick measured: every fixed recipe acf runs (acf.search.recipes) on the default model, the calibration
mix (task text + general text) for GPTQ, AutoRound and kd_tune, and acf's AutoRound allocations + kd_tune against
the best recipe at their sizes, with paired bootstrap intervals.

    python3 experiments/bench_recipes.py --device cuda --limit 400 --calib-samples 128 --resume     # GPU
    .venv/bin/python experiments/bench_recipes.py --limit 40 --calib-samples 16 --configs gptq_w4g64_ao  # CPU

kld / top1 on `--limit` GSM8K test items (the first of acf's seed-0 permutation; calibration and kd_tune use the
train split only), kld_general on `--general-per-source` test items of each other shipped task (TruthfulQA,
HumanEval, CommonsenseQA; never in any calibration text), per source too. Sizes are the safetensors weight files.
Writes experiments/results/recipes-<device>.json and .md after every row (`--resume` keeps rows already written,
so a run cut by a time limit goes on where it stopped).
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
sys.path.insert(0, str(ROOT / "src"))
MIXES = (0.0, 0.25, 0.5)
sys.path.insert(0, str(ROOT / "experiments"))
from bench_fidelity import _v, _ver  # noqa: E402  (one copy of the row helpers the benchmark tables share)


def configs(spec, calib: dict, kd_steps: int = 100) -> dict[str, dict]:
    """name -> {"steps": [...], "mix": share of general text, "group": which table it belongs to}. GGUF recipes
    (llama.cpp's k-quants with the importance matrix, measured in llama.cpp on the CPU) are group "recipe" too."""
    from acf.methods.mixed import LayerShape, effective_bits
    from acf.search.recipes import available

    out = {n: {"steps": s["steps"], "mix": 0.0, "group": "recipe"}
           for rt in ("transformers", "llamacpp") for n, s in available(spec, rt, calib).items()}
    g = max(gs for gs in spec.valid_group_sizes if gs <= 128)
    shapes = [LayerShape(name=l.name, out_features=l.out_features, in_features=l.in_features) for l in spec.linears
              if not l.name.endswith("lm_head")]
    # the budgets of acf's allocations: exactly the uniform recipes' sizes (W4 g<g>, W3 g<g>); W3 g<g> is also the
    # palette's floor, so at its size the allocation can only give every layer w3g<g> (then kd_tune is what differs)
    w4 = effective_bits(shapes, {s.name: f"w4g{g}" for s in shapes}, 2)
    w3 = effective_bits(shapes, {s.name: f"w3g{g}" for s in shapes}, 2)
    kd = {"method": "kd_tune", "params": {"steps": kd_steps}}
    ao = {"bits": 4, "group_size": g, "act_order": True, **calib}
    ar = {"bits": 4, "group_size": g, **calib}
    for mix in MIXES:
        tag = f"@mix{mix:g}"
        if mix:
            out[f"gptq_w4g{g}_ao{tag}"] = {"steps": [{"method": "gptq", "params": ao}], "mix": mix, "group": "mix"}
            out[f"autoround_w4g{g}{tag}"] = {"steps": [{"method": "autoround", "params": ar}], "mix": mix,
                                             "group": "mix"}
        out[f"gptq_w4g{g}_ao+kd{kd_steps}{tag}"] = {"steps": [{"method": "gptq", "params": ao}, kd], "mix": mix,
                                             "group": "mix"}
    for bits, label in ((w4, f"w4g{g}"), (w3, f"w3g{g}")):
        p = {"avg_bits": bits, **calib}
        out[f"autoround_mixed@{label}"] = {"steps": [{"method": "autoround", "params": p}], "mix": 0.0,
                                           "group": "acf"}
        out[f"autoround_mixed@{label}+kd{kd_steps}"] = {"steps": [{"method": "autoround", "params": p}, kd], "mix": 0.0,
                                                 "group": "acf"}
    out[f"autoround_w4g{g}+kd{kd_steps}"] = {"steps": [{"method": "autoround", "params": ar}, kd], "mix": 0.0,
                                      "group": "acf"}
    gm = {"method": "gptq", "params": {"avg_bits": w4, "act_order": True, **calib}}
    out[f"gptq_mixed@w4g{g}_ao+kd{kd_steps}"] = {"steps": [gm, kd], "mix": 0.0, "group": "acf"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="all", help="comma list of config names, or all")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--general-per-source", type=int, default=100)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kd-steps", type=int, default=100, help="kd_tune steps of the +kd rows (named +kd<steps>)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = ap.parse_args()

    from acf.core.provenance import device_string
    from acf.evaluation.fidelity import build_reference
    from acf.evaluation.general_text import general_texts
    from acf.evaluation.runner import Loaded, build_fidelity, eval_items, evaluate
    from acf.evaluation.sequences import text_sequences
    from acf.methods.base import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.methods.strategy import validate_strategy
    from acf.models.loading import resolve_device, resolve_model
    from acf.models.spec import infer_spec
    from acf.tasks import get_task

    # --render only rewrites a table: `--device cuda --render` works on a machine without CUDA
    device = args.device if args.render and args.device != "auto" else resolve_device(args.device)
    cuda = device.startswith("cuda")
    kind = "cuda" if cuda else "cpu"
    stem = Path(args.out) / f"recipes-{kind}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    spec = infer_spec(model_dir)
    calib = {"calib_samples": args.calib_samples, "seq_len": args.seq_len}
    cfgs = configs(spec, calib, args.kd_steps)
    names = list(cfgs) if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
    if [n for n in names if n not in cfgs]:
        print(f"unknown config(s); choose from {list(cfgs)}", file=sys.stderr)
        return 2
    import importlib.metadata as md

    res: dict = {"device": "" if args.render else device_string(device), "device_kind": kind, "python": platform.python_version(),
                 "model": str(model_dir), "date": time.strftime("%Y-%m-%d %H:%M"), "limit": args.limit,
                 "general_per_source": args.general_per_source, "calib": calib, "kd_steps": args.kd_steps,
                 "versions": {p: _ver(md, p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors",
                                                       "auto-round")},
                 "rows": [], "notes": [], "complete": False}
    if (args.resume or args.render) and stem.with_suffix(".json").is_file():
        old = json.loads(stem.with_suffix(".json").read_text())
        res["rows"], res["notes"] = old.get("rows", []), old.get("notes", [])
        if args.render:
            res.update({k: old[k] for k in res if k in old and k != "rows"})

    def write() -> None:
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(res))

    if args.render:
        write()
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    gsm = get_task("gsm8k")
    items = eval_items(gsm, args.limit, 0)
    base = Loaded.load(model_dir, device)
    bs = None if cuda else 8
    fid = build_fidelity(base.model, base.tokenizer, gsm, items, general=False, batch_size=bs,
                         model_name=str(model_dir))
    texts, used = general_texts("gsm8k", "search", per_source=args.general_per_source)
    fid.general_seqs = text_sequences(texts, base.tokenizer)
    fid.general_sources = used
    fid.general = build_reference(base.model, base.tokenizer, fid.general_seqs, batch_size=bs or 8,
                                  model_name=str(model_dir))
    metrics = ["kld", "top1", "kld_general", "size", "bits_per_weight"]

    def measure(path: Path, loaded) -> dict:
        r = evaluate(path, gsm, metrics, limit=args.limit, device=device, loaded=loaded, fidelity=fid,
                     batch_size=bs, show_progress=False)
        out = {k: m.model_dump() for k, m in r.metrics.items()}
        out["kld_by_source"] = by_source(out.get("kld_general"), [s.id for s in fid.general_seqs])
        return out

    done = {r["config"] for r in res["rows"]}
    if "baseline" not in done:
        res["rows"].insert(0, {"config": "baseline", "group": "baseline", "status": "ok",
                               **measure(model_dir, base)})
        write()
    base.free()
    work = Path(tempfile.mkdtemp(prefix="acf-recipes-"))
    try:
        for name in names:
            if name in done:
                continue
            c = cfgs[name]
            strat = validate_strategy({"steps": c["steps"]}, spec, device)
            ctx = StepContext(device=device, task=gsm, teacher_dir=model_dir, calib_mix=c["mix"])
            out = work / name
            t = time.perf_counter()
            try:
                recs = run_strategy(strat, model_dir, out, ctx)
            except Exception as e:  # noqa: BLE001 - a failing config is a row with its reason
                recs, err = [], f"{type(e).__name__}: {e}"
            else:
                err = next((r.reason for r in recs if r.status != "ok"), None)
            row: dict = {"config": name, "group": c["group"], "mix": c["mix"], "strategy": strat.describe(),
                         "wall_seconds": round(time.perf_counter() - t, 1),
                         "step_seconds": {r.method: r.wall_seconds for r in recs}}
            if err is None and recs:
                # a GGUF is measured in llama.cpp (evaluate dispatches on the folder); others load in transformers
                ld = None if (out / "model.gguf").is_file() else Loaded.load(out, device)
                try:
                    row.update(status="ok", **measure(out, ld))
                finally:
                    if ld is not None:
                        ld.free()
                mp = next((r.extra["mixed_precision"] for r in recs if r.extra.get("mixed_precision")), None)
                if mp:
                    row["allocation"] = {k: mp["allocation"].get(k) for k in ("budget_bits", "effective_bits",
                                                                              "counts")}
            else:
                row.update(status="failed", reason=(err or "no step ran")[:600])
            shutil.rmtree(out, ignore_errors=True)
            res["rows"].append(row)
            print(line(row), flush=True)
            write()
        res["complete"] = all(n in {r["config"] for r in res["rows"]} for n in cfgs)
        write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {stem}.json and .md")
    return 0


def per_item(m: dict | None) -> dict | None:
    """A Measurement's per-item sums (`extra.per_item`; this table's first rows stored them as `extra.items`)."""
    extra = (m or {}).get("extra", {})
    old = extra.get("items")
    return extra.get("per_item") or (old if isinstance(old, dict) and "sums" in old else None)


def by_source(m: dict | None, ids: list[str]) -> dict:
    """kld_general split by source (the per-item sums the Measurement keeps; ids are '<source>/<item>')."""
    items = per_item(m)
    if not items:
        return {}
    acc: dict[str, list[float]] = {}
    for i, s, n in zip(ids, items["sums"], items["tokens"]):
        a = acc.setdefault(i.split("/")[0], [0.0, 0])
        a[0] += s
        a[1] += n
    return {k: round(v[0] / max(v[1], 1), 5) for k, v in acc.items()}



def line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['config']:<34} FAILED {row.get('reason')}"
    return (f"{row['config']:<34} {_v(row, 'size') / 2**20:7.2f} MiB  kld {_v(row, 'kld'):.4f}  general "
            f"{_v(row, 'kld_general'):.4f}  top1 {_v(row, 'top1'):.3f}  ({row['wall_seconds']} s)")


def best_recipe_for(rows: list[dict], size: float) -> dict | None:
    """The recipe an acf model of `size` is compared with, as the run's headline does (acf.reports.headline): the
    smallest recipe size S at or above `size`, then the best (lowest kld) recipe no larger than S."""
    recipes = [r for r in rows if r.get("group") == "recipe" and r["status"] == "ok"]
    above = [_v(r, "size") for r in recipes if _v(r, "size") >= size]
    if not above:
        return None
    fit = [r for r in recipes if _v(r, "size") <= min(above)]
    return min(fit, key=lambda r: _v(r, "kld"))


def paired(a: dict, b: dict, metric: str) -> str:
    from acf.core.stats import paired_ratio

    pr = paired_ratio(per_item(a.get(metric)), per_item(b.get(metric)))
    return "–" if pr is None else f"{pr[0]:.2f}x [{pr[1][0]:.2f}, {pr[1][1]:.2f}]"


def markdown(res: dict) -> str:
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    md = [f"# The yardstick: fixed recipes, calibration mix, acf's allocations ({res['device']})", "",
          f"{res['date']}; default model {res['model']} (its weights come from a Q4_1 GGUF: see the README); "
          f"kld/top1 on {res['limit']} GSM8K test items (seed-0 permutation), kld_general on "
          f"{res['general_per_source']} test items of each other shipped task; calibration {res['calib']} from the "
          f"GSM8K train split (plus general train text where a mix is given); kd_tune rows ran "
          f"{res.get('kd_steps', 100)} steps; sizes are the weight files (safetensors, or the GGUF measured in "
          f"llama.cpp); "
          f"intervals: per-model 95% (items as clusters), ratios paired bootstrap over items. Versions: "
          f"{res['versions']}.", ""]
    md += [f"- {n}" for n in res.get("notes", [])] + ([""] if res.get("notes") else [])
    base = next((r for r in rows if r["config"] == "baseline"), None)
    if base:
        md += [f"Baseline: {_v(base, 'size') / 2**20:.1f} MiB.", ""]
    md += ["## Fixed recipes (the yardstick)", "",
           "| recipe | size MiB | kld | kld_general | top1 | by source (kld_general) | build s |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if r.get("group") == "recipe"), key=lambda r: _v(r, "size")):
        md.append(f"| {r['config']} | {_v(r, 'size') / 2**20:.2f} | {_ci(r.get('kld'))} | {_ci(r.get('kld_general'))} "
                  f"| {_v(r, 'top1'):.3f} | {', '.join(f'{k} {v:.3f}' for k, v in r.get('kld_by_source', {}).items())}"
                  f" | {r['wall_seconds']} |")
    md += ["", "## Calibration mix (share of general text)", "",
           "| config | mix | kld | kld_general | by source |", "|---|---|---|---|---|"]
    for r in rows:
        if r.get("group") == "mix" or (r.get("group") == "recipe" and r["config"] in
                                       {c.split("@")[0] for c in (x["config"] for x in rows) if "@mix" in c}):
            md.append(f"| {r['config']} | {r.get('mix', 0):g} | {_ci(r.get('kld'))} | {_ci(r.get('kld_general'))} "
                      f"| {', '.join(f'{k} {v:.3f}' for k, v in r.get('kld_by_source', {}).items())} |")
    md += ["", "## acf's allocations against the best recipe at the nearest recipe size at or above theirs", "",
           "| config | size MiB | kld | kld_general | best recipe at that size | its kld / kld_general | "
           "kld ratio | kld_general ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("group") != "acf":
            continue
        b = best_recipe_for(rows, _v(r, "size"))
        md.append(f"| {r['config']} | {_v(r, 'size') / 2**20:.2f} | {_ci(r.get('kld'))} | {_ci(r.get('kld_general'))} "
                  f"| {b['config'] if b else '–'} | "
                  + (f"{_v(b, 'kld'):.4f} / {_v(b, 'kld_general'):.4f} | {paired(r, b, 'kld')} | "
                     f"{paired(r, b, 'kld_general')} |" if b else "– | – | – |"))
    failed = [r for r in res["rows"] if r["status"] != "ok"]
    if failed:
        md += ["", "## Failed", ""] + [f"- {r['config']}: {r.get('reason')}" for r in failed]
    return "\n".join(md) + "\n"


def _ci(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    s = f"{m['value']:.4f}"
    return s + (f" [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}]" if m.get("ci95") else "")


if __name__ == "__main__":
    sys.exit(main())
