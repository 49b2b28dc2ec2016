"""How the search itself did: predictions against measurements, proposals screened out, aimed episodes, and where
the frontier's points came from (seeds or the search). One place for these figures: the report's "Search" section,
bench scripts and the README read `search_stats`."""

from __future__ import annotations

from typing import Any

from acf.coordinator.state import FrontierFile
from acf.reports.markdown import table
from acf.search.aim import gaps
from acf.search.surrogate import spearman


def search_stats(ff: FrontierFile) -> dict[str, Any]:
    pairs = [(c.id, c.prediction.kld, c.metrics["kld"].value) for c in ff.candidates
             if c.status == "ok" and c.prediction is not None and c.prediction.kld is not None
             and "kld" in c.metrics and c.metrics["kld"].value is not None]
    base_size = (ff.baseline.metrics["size"].value if ff.baseline is not None and "size" in ff.baseline.metrics
                 else None)
    front = [ff.candidate(i) for i in ff.frontier if ff.baseline is None or i != ff.baseline.id]
    small = [c for c in front if base_size is None or ("size" in c.metrics and c.metrics["size"].value < base_size)]
    from_seeds = [c.id for c in small if c.proposed_by == "seed recipe"]
    saved = [s.saved_seconds for s in ff.screened if s.saved_seconds is not None]
    return {
        "predicted_vs_measured": pairs,
        "spearman": spearman([p for _, p, _ in pairs], [m for _, _, m in pairs]),
        "screened": len(ff.screened),
        "screened_saved_seconds": round(sum(saved), 1) if saved else None,
        "aimed": [(c.id, c.aim) for c in ff.candidates if c.aim],
        "frontier_below_baseline": len(small),
        "frontier_from_seeds": len(from_seeds),
        "frontier_after_seeds": len(small) - len(from_seeds),
    }


def search_section(ff: FrontierFile) -> list[str]:
    st = search_stats(ff)
    md = ["## Search", ""]
    g = gaps(ff)
    if g:
        md += ["Gap to the recipe frontier now (acf's best kld at no larger size / the best fixed recipe's; the next "
               "aimed episode targets the largest):", ""]
        md += [table(["size", "recipe", "recipe kld", "acf's best", "acf kld", "ratio"],
                     [[f"{x.size / 2**20:.1f} MiB", f"`{x.recipe_id}`", f"{x.recipe_kld:.4f}",
                       f"`{x.acf_id}`" if x.acf_id else "–", f"{x.acf_kld:.4f}" if x.acf_kld is not None else "–",
                       f"{x.ratio:.2f}x" if x.acf_id else "none that small"] for x in g]), ""]
    md += [f"- Frontier points below the baseline's size: {st['frontier_below_baseline']}, of which "
           f"{st['frontier_after_seeds']} came from episodes after the seeds and {st['frontier_from_seeds']} from "
           f"the seeds."]
    rho = st["spearman"]
    md += [f"- Predicted vs measured kld over {len(st['predicted_vs_measured'])} episodes (the prediction made "
           f"before each ran, acf.search.surrogate: an estimate): Spearman's rho "
           + (f"{rho:.2f}" if rho is not None else "– (fewer than 3 pairs)") + "."]
    saved = st["screened_saved_seconds"]
    md += [f"- Proposals screened out by their prediction (never run): {st['screened']}"
           + (f"; estimated time saved {saved:.0f} s (the median measured episode's wall time each)" if saved else "")
           + "."]
    md += [f"- Aimed episodes: {len(st['aimed'])}.", ""]
    rows = []
    for c in ff.candidates:
        if c.prediction is None and not c.aim:
            continue
        meas = c.metrics.get("kld")
        pred = c.prediction
        rows.append([f"`{c.id}`", c.strategy.describe()[:70], (f"{c.aim['size'] / 2**20:.1f} MiB, "
                                                               f"{c.aim['budget']} bits" if c.aim else "–"),
                     f"{pred.kld:.4f}" if pred is not None and pred.kld is not None else "–",
                     f"{meas.value:.4f}" if meas is not None and meas.value is not None else c.status,
                     f"{pred.size / 2**20:.1f}" if pred is not None and pred.size else "–",
                     f"{c.metrics['size'].value / 2**20:.1f}" if "size" in c.metrics else "–"])
    if rows:
        md += [table(["id", "strategy", "aimed at", "predicted kld", "measured kld", "predicted MiB", "measured MiB"],
                     rows), ""]
    if ff.screened:
        md += ["Screened out:", ""]
        md += [table(["trial", "strategy", "predicted kld", "predicted MiB", "dominated by", "its kld", "margin"],
                     [[str(s.trial_number), s.description[:70], f"{s.prediction.kld:.4f}",
                       f"{(s.prediction.size or 0) / 2**20:.1f}", f"`{s.dominated_by}`", f"{s.dominated_kld:.4f}",
                       f"{s.margin:.1f}x"] for s in ff.screened]), ""]
    return md
