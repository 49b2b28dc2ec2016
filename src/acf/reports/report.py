"""Write a run's human report (markdown + PNG plots) next to its frontier.json.

The report is rebuilt from frontier.json (and the baseline sanity check's sanity.json, when there is one), so it
can be regenerated at any time (and by anyone with the files) without the run's other state. Frames and plots come
from `acf.reports.frontier_frame`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from acf.core.metrics import control_columns, fidelity_columns, get as metric_row
from acf.core.objectives import DIRECTIONS
from acf.reports.frontier_frame import NON_OK, frontier_to_frame, write_plots
from acf.reports.search_quality import search_section
from acf.reports.headline import headline_section
from acf.reports.markdown import table as _table
from acf.coordinator.state import FrontierFile, load_frontier_file

# ----------------------------------------------------------------------------------------------- markdown

def fmt(value: Any, metric: str = "", unit: str = "") -> str:
    """Human formatting: bytes as MiB, ratios with 3 decimals, everything else 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        row = metric_row(metric)
        if unit == "bytes" or (row is not None and row.unit == "bytes"):
            return f"{value / 2**20:.1f} MiB"
        if row is not None and row.unit == "count":
            return f"{value / 1e6:.2f} M"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def time_per_stage(ff: FrontierFile) -> pd.DataFrame:
    """Seconds per stage summed over every candidate (baseline included), from each candidate's `timings`."""
    acc: dict[str, list[float]] = {}
    for c in ([ff.baseline] if ff.baseline else []) + ff.candidates:
        for k, v in c.timings.items():
            acc.setdefault(k, []).append(float(v))
    rows = [{"stage": k, "seconds": sum(v), "candidates": len(v), "mean_seconds": sum(v) / len(v)}
            for k, v in acc.items()]
    return pd.DataFrame(rows, columns=["stage", "seconds", "candidates", "mean_seconds"])


def build_report(ff: FrontierFile, plots: Sequence[Path] = (), plot_dir_name: str = "report_plots",
                 sanity_md: Sequence[str] = ()) -> str:
    from acf.search.reward import reward as reward_fn

    df = frontier_to_frame(ff)
    r = ff.run
    objs = list(r.objectives)
    units = {k: m.unit for k, m in (ff.baseline.metrics.items() if ff.baseline else [])}
    md: list[str] = [f"# acf report: run `{r.run_id}`", ""]
    md += [_table(["field", "value"], [
        ["model", f"`{r.model}` ({r.model_path})"], ["dataset", r.dataset],
        ["objectives", ", ".join(f"{o} ({r.directions.get(o, DIRECTIONS.get(o, '?'))})" for o in objs)],
        ["reward preset", r.preset], ["min retention", fmt(r.min_retention)], ["sampler", f"{r.sampler} (seed {r.seed})"],
        ["eval limit / proxy limit", f"{r.limit} / {r.proxy_limit}"], ["episodes", str(r.episodes)],
        ["device", f"{r.device} {r.device_name}".strip()], ["acf version / git commit", f"{r.acf_version} / {r.git_commit}"],
        ["created / updated", f"{r.created_at} / {r.updated_at}"], ["wall time", f"{r.wall_seconds:.1f} s"],
        ["stopped because", str(r.stopped_because)], ["candidates", f"{len(ff.candidates)} "
         f"({sum(c.status == 'ok' for c in ff.candidates)} ok)"], ["on the frontier", str(len(ff.frontier))],
    ]), ""]

    md += headline_section(ff)
    md += ["## Baseline", ""]
    if ff.baseline is None:
        md += ["No baseline was recorded; retention and compression ratios cannot be computed.", ""]
    else:
        rows = []
        for k, m in ff.baseline.metrics.items():
            ci = f"[{fmt(m.ci95[0], k, m.unit)}, {fmt(m.ci95[1], k, m.unit)}]" if m.ci95 else "–"
            rows.append([k, fmt(m.value, k, m.unit), m.unit or "–", ci, str(m.n) if m.n is not None else "–",
                         m.how, fmt(m.device)])
        md += [_table(["metric", "value", "unit", "95% CI", "n", "how", "device"], rows), ""]
    md += list(sanity_md)

    md += _runtime_section(ff)
    md += ["## Frontier", "",
           "Non-dominated candidates over the objectives. Retention is quality relative to the baseline; "
           "compression ratio = baseline size / size.", ""]
    front = df[df["on_frontier"]] if len(df) else df
    rows = []
    for cid, row in front.iterrows():
        rows.append([f"`{cid}`" + (" ★" if row["recommended"] else ""), fmt(row["strategy"])]
                    + [fmt(row.get(o), o, units.get(o, "")) for o in objs]
                    + [fmt(row["retention"]), fmt(row["compression_ratio"]), fmt(row["reward"])])
    md += [_table(["id", "strategy"] + objs + ["retention", "compression ratio", "reward"], rows) if rows
           else "The frontier is empty.", ""]

    md += ["## Recommended pick", ""]
    rec = ff.recommended
    if rec is None:
        md += ["No recommendation (no feasible candidate on the frontier).", ""]
    else:
        c = ff.candidate(rec.id)
        md += [f"**`{rec.id}`**: {c.strategy.describe()} — reward {rec.reward:.4f} under preset `{rec.preset}`.", "",
               f"Why: {rec.why}", ""]
        base_vals = ff.baseline.objectives if ff.baseline else {}
        if base_vals and all(o in c.objectives and o in base_vals for o in objs):
            rr = reward_fn(c.objectives, base_vals, objs, rec.preset, r.min_retention)
            rows = [[o, fmt(c.objectives[o], o, units.get(o, "")), fmt(base_vals[o], o, units.get(o, "")),
                     f"{rr.normalised[o]:.4f}", f"{rr.weights[o]:.3f}", f"{rec.terms.get(o, rr.terms[o]):.4f}"]
                    for o in objs]
            rows.append(["constraint penalty", "", "", "", "", f"-{rr.penalty:.4f}"])
            md += [_table(["objective", "value", "baseline", "normalised (retention/saving)", "weight",
                           "term"], rows), ""]
        else:
            md += [_table(["objective", "term"], [[k, f"{v:.4f}"] for k, v in rec.terms.items()]), ""]

    md += _fidelity_section(ff, units)
    md += _adaptation_section(ff)
    md += search_section(ff)

    md += ["## All candidates", ""]
    rows = []
    for cid, row in df.iterrows():
        rows.append([f"`{cid}`", str(row["episode"]), row["status"], fmt(row["strategy"])]
                    + [fmt(row.get(o), o, units.get(o, "")) for o in objs]
                    + [fmt(row["retention"]), fmt(row["compression_ratio"]), fmt(row["on_frontier"])])
    md += [_table(["id", "episode", "status", "strategy"] + objs + ["retention", "compression ratio", "frontier"],
                  rows), ""]

    bad = [c for c in ff.candidates if c.status in NON_OK]
    md += ["## Failed, pruned, rejected and skipped candidates", ""]
    md += [_table(["id", "status", "strategy", "reason"],
                  [[f"`{c.id}`", c.status, fmt(c.strategy.describe()), fmt(c.reason or "(no reason recorded)")]
                   for c in bad]) if bad else "None.", ""]

    tps = time_per_stage(ff)
    md += ["## Time per stage", "", "Seconds summed over all candidates (baseline included).", ""]
    md += [_table(["stage", "total s", "candidates", "mean s"],
                  [[s.stage, f"{s.seconds:.2f}", str(s.candidates), f"{s.mean_seconds:.2f}"]
                   for s in tps.itertuples()]) if len(tps) else "No timings recorded.", ""]

    md += ["## Hypervolume per episode", ""]
    md += [_table(["episode", "hypervolume"], [[str(h.episode), f"{h.hypervolume:.6f}"] for h in ff.hypervolume])
           if ff.hypervolume else "No hypervolume recorded.", ""]
    if ff.reference_point:
        md += ["Reference point: " + ", ".join(f"{k}={fmt(v, k, units.get(k, ''))}"
                                                for k, v in ff.reference_point.items()), ""]

    if plots:
        md += ["## Plots", "", "Grey: dominated; blue: frontier; black square: baseline; star: recommended.", ""]
        md += [f"![{p.stem}]({plot_dir_name}/{p.name})" for p in plots]
        md += [""]
    return "\n".join(md)


FIDELITY_COLS = fidelity_columns()


def _runtime_section(ff: FrontierFile) -> list[str]:
    """Which runtime measured latency/memory: one line when all agree, a warning when the figures mix runtimes
    (e.g. GGUF candidates in llama.cpp beside the transformers baseline), so no comparison across runtimes is
    read as a like-for-like one."""
    seen: dict[str, list[str]] = {}
    for c in ([ff.baseline] if ff.baseline else []) + [c for c in ff.candidates if c.status == "ok"]:
        for k in ("latency", "memory"):
            m = c.metrics.get(k)
            if m is not None and m.value is not None:
                label = (m.runtime or "?").split(" (")[0]
                if label.startswith("python"):
                    label = "transformers"
                seen.setdefault(label, []).append(c.id)
    if not seen:
        return []
    if len(seen) == 1:
        return [f"Latency and memory were all measured in one runtime: {next(iter(seen))}.", ""]
    parts = "; ".join(f"{k}: {', '.join(sorted(set(v))[:8])}" for k, v in seen.items())
    return [f"**Latency and memory come from different runtimes** ({parts}): a latency comparison across them "
            f"compares runtimes as much as compression.", ""]


def versus_fixed(ff: FrontierFile, metric: str = "kld") -> Optional[dict[str, Any]]:
    """The recommended pick against the best fixed 4-bit recipe (`FrontierFile.best_fixed_recipe`), on the search
    items and, where both were measured there, on the held-out items. The comparison holds only at no larger
    size, which is reported."""
    best = ff.best_fixed_recipe(metric)
    if best is None or ff.recommended is None:
        return None
    pick = ff.candidate(ff.recommended.id)
    if metric not in pick.metrics or "size" not in pick.metrics or "size" not in best.metrics:
        return None
    pv, bv = pick.metrics[metric].value, best.metrics[metric].value
    fits = [c for c in ff.candidates if c.status == "ok" and metric in c.metrics and "size" in c.metrics
            and c.metrics["size"].value <= best.metrics["size"].value and c.metrics[metric].value is not None]
    at_size = min(fits, key=lambda c: c.metrics[metric].value) if fits else best
    out = {"best_at_size": at_size.id, "best_at_size_value": at_size.metrics[metric].value,
           "best_at_size_ratio": (at_size.metrics[metric].value / bv) if bv else None, "fixed": best.id,
           "fixed_strategy": best.strategy.describe(), "fixed_value": bv, "fixed_size": best.metrics["size"].value,
           "pick": pick.id, "pick_strategy": pick.strategy.describe(), "pick_value": pv,
           "pick_size": pick.metrics["size"].value, "ratio": (pv / bv) if bv else None,
           "no_larger": pick.metrics["size"].value <= best.metrics["size"].value}
    hp, hb = pick.final_metrics.get(metric), best.final_metrics.get(metric)
    if hp is not None and hb is not None and hp.value is not None and hb.value:
        out.update(held_out_pick=hp.value, held_out_fixed=hb.value, held_out_ratio=hp.value / hb.value,
                   held_out_n=hp.n)
    return out


def _fidelity_section(ff: FrontierFile, units: dict) -> list[str]:
    sets = ff.run.item_sets or {}
    md = ["## Fidelity to the uncompressed model", "",
          "kld: mean per-token KL(baseline ‖ candidate) of next-token distributions, teacher-forced; top1: share of "
          "positions where both pick the same token; kld_general: kld on other tasks' test text no recipe trains "
          "on. Search columns are on the items that ranked candidates"
          + (f" (test items {sets['search']['offset']}..+{sets['search']['count']})" if sets.get("search") else "")
          + "; held-out columns on items the search never saw"
          + (f" (from item {sets['report']['offset']}, up to {sets['report']['count']})" if sets.get("report") else "")
          + ".", ""]
    recipe = ff.best_fixed_recipe()
    ids = ((["baseline"] if ff.baseline else []) + [c for c in ff.frontier if c != "baseline"]
           + ([recipe.id] if recipe is not None and recipe.id not in ff.frontier else []))   # the comparison's recipe
    cols = [m for m in FIDELITY_COLS if any(m in ff.candidate(i).metrics for i in ids)]
    held = [m for m in FIDELITY_COLS if any(m in ff.candidate(i).final_metrics for i in ids)]
    rows = []
    for i in ids:
        c = ff.candidate(i)
        rows.append([f"`{i}`", fmt(c.strategy.describe()), fmt((c.metrics.get("size") or c.final_metrics.get("size")
                                                                 or _none()).value, "size")]
                    + [fmt(c.metrics[m].value) if m in c.metrics else "–" for m in cols]
                    + [fmt(c.final_metrics[m].value) if m in c.final_metrics else "–" for m in held])
    md += [_table(["id", "strategy", "size"] + [f"{m} (search)" for m in cols] + [f"{m} (held-out)" for m in held],
                  rows), ""]
    vs = versus_fixed(ff)
    if vs:
        md += [f"Against the best fixed recipe `{vs['fixed']}` ({vs['fixed_strategy']}, kld {vs['fixed_value']:.4f} "
               f"at {fmt(vs['fixed_size'], 'size')}): the recommended `{vs['pick']}` has kld {vs['pick_value']:.4f} "
               f"at {fmt(vs['pick_size'], 'size')} = {vs['ratio']:.2f}x the recipe's damage"
               + ("" if vs["no_larger"] else " (but it is larger, so this is not a same-size comparison)") + ". "
               f"At no more than the recipe's size the most faithful candidate is `{vs['best_at_size']}` "
               f"(kld {vs['best_at_size_value']:.4f}, {vs['best_at_size_ratio']:.2f}x the recipe's)."
               + (f" Held out ({vs['held_out_n']} items the search never saw): `{vs['pick']}` "
                  f"{vs['held_out_pick']:.4f} vs `{vs['fixed']}` {vs['held_out_fixed']:.4f} = "
                  f"{vs['held_out_ratio']:.2f}x." if "held_out_ratio" in vs else ""), ""]
    return md


def _none():
    from acf.core.provenance import Measurement

    return Measurement(value=None)


def _adaptation_section(ff: FrontierFile) -> list[str]:
    """Per candidate with recovery steps: how much of its change is task adaptation (its control: the baseline given
    the same recovery, no compression) and how much is compression (candidate minus control)."""
    with_ctrl = [c for c in ff.candidates if c.status == "ok" and c.control]
    md = ["## Task adaptation vs compression", ""]
    if not with_ctrl:
        return md + ["No candidate trained on the task (no LoRA or distillation step), so no control was needed. "
                     "kd_tune needs none: it trains toward the uncompressed model's own distributions, so the "
                     "uncompressed model given the same step is the baseline.", ""]
    md += ["LoRA and distillation train on the task's train split. Their control rows are the uncompressed model "
           "given the same recovery steps and no compression: control − baseline is task adaptation, candidate − "
           "control is what compression did. A lower answer NLL than the baseline's is adaptation, not compression "
           "quality. kd_tune needs no control: it trains toward the uncompressed model's own distributions (its "
           "control would be the baseline).", ""]
    base = ff.baseline
    rows = []
    for c in with_ctrl:
        ctrl = ff.candidate(c.control)
        for m in control_columns():
            if base is None or m not in c.metrics or m not in ctrl.metrics or m not in base.metrics:
                continue
            b, k, v = base.metrics[m].value, ctrl.metrics[m].value, c.metrics[m].value
            if None in (b, k, v):
                continue
            rows.append([f"`{c.id}`", fmt(c.strategy.describe()), m, fmt(b), f"`{ctrl.id}` {fmt(k)}", fmt(v),
                         f"{k - b:+.4f}", f"{v - k:+.4f}"])
    md += [_table(["id", "strategy", "metric", "baseline", "control", "candidate", "adaptation (control − base)",
                   "compression (candidate − control)"], rows) if rows else "Controls failed; see frontier.json.", ""]
    return md


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md and run_dir/report_plots/*.png from run_dir/frontier.json; return report.md."""
    from acf.core.atomic import write_text

    run_dir = Path(run_dir)
    if run_dir.name == "frontier.json":
        run_dir = run_dir.parent
    ff = load_frontier_file(run_dir)
    plots = write_plots(frontier_to_frame(ff), run_dir / "report_plots")
    out = run_dir / "report.md"
    write_text(out, build_report(ff, plots, sanity_md=_sanity_section(run_dir)))
    return out


def _sanity_section(run_dir: Path) -> list[str]:
    """The baseline sanity check as the run recorded it (sanity.json), and whether --skip-sanity overrode it."""
    from acf.core.errors import AcfError
    from acf.evaluation.sanity import SANITY_FILE, load_report, markdown

    cfg = run_dir / "run_config.json"
    skipped = bool(json.loads(cfg.read_text()).get("skip_sanity")) if cfg.is_file() else False
    try:
        return markdown(load_report(run_dir / SANITY_FILE), skipped)
    except AcfError as e:   # the frontier is still worth reporting; the damaged record is named
        return ["## Baseline sanity check", "", str(e), ""]
