"""The report's headline: at each size of the recipe frontier, acf's best candidate at no larger size against the
best fixed recipe there, on the search items, the held-out task items and general text, with paired intervals.

This is the one place a run states "acf beats the recipes" (or that it does not): it compares with the best recipe
of the whole yardstick at that size (acf.search.recipes: GPTQ ± act-order at every group size, AWQ, AutoRound,
k-quants with the importance matrix, ...), never with a weaker one, and it shows kld_general beside kld so a gain on
the task's text that costs general text shows as the trade-off it is.
"""

from __future__ import annotations

from typing import Any, Optional

from acf.core.stats import paired_ratio
from acf.coordinator.state import Candidate, FrontierFile
from acf.reports.markdown import table

#: (label, metric, where): the comparisons of each headline row
COMPARISONS = (("kld, search items", "kld", "metrics"), ("kld, held out", "kld", "final_metrics"),
               ("kld_general, held out", "kld_general", "final_metrics"))


def _value(c: Candidate, metric: str, where: str) -> Optional[float]:
    m = getattr(c, where).get(metric)
    return None if m is None else m.value


def _items(c: Candidate, metric: str, where: str) -> Optional[dict]:
    m = getattr(c, where).get(metric)
    return None if m is None else m.extra.get("per_item")


def headline(ff: FrontierFile, metric: str = "kld") -> list[dict[str, Any]]:
    """One row per recipe of the recipe frontier (smallest first): the recipe, acf's best candidate no larger than
    it (None when acf has none that small), and for each comparison both values and the paired ratio acf/recipe
    with its 95% bootstrap interval over items (None where either side was not measured on the same items)."""
    rows = []
    for r in ff.recipe_frontier(metric):
        size = r.metrics["size"].value
        best = ff.best_candidate_at(size, metric)
        row: dict[str, Any] = {"recipe": r.id, "recipe_strategy": r.strategy.describe(), "recipe_size": size,
                               "acf": None if best is None else best.id,
                               "acf_strategy": None if best is None else best.strategy.describe(),
                               "acf_size": None if best is None else best.metrics["size"].value, "comparisons": {}}
        for label, m, where in COMPARISONS:
            rv = _value(r, m, where)
            av = None if best is None else _value(best, m, where)
            pr = None if best is None else paired_ratio(_items(best, m, where), _items(r, m, where))
            row["comparisons"][label] = {"recipe": rv, "acf": av,
                                         "ratio": pr[0] if pr else (av / rv if av is not None and rv else None),
                                         "ci95": pr[1] if pr else None,
                                         "n": (getattr(r, where).get(m).n if getattr(r, where).get(m) else None)}
        rows.append(row)
    return rows


def _fmt_cmp(c: dict) -> str:
    if c["acf"] is None or c["recipe"] is None:
        return "–"
    s = f"{c['acf']:.4f} vs {c['recipe']:.4f}"
    if c["ratio"] is not None:
        s += f" = **{c['ratio']:.2f}x**"
        if c["ci95"] is not None:
            s += f" [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
    return s


def headline_section(ff: FrontierFile) -> list[str]:
    """Markdown: the headline table, which recipes were measured, and which failed."""
    md = ["## Against the best fixed recipe at each size", ""]
    measured = ff.measured_recipes()
    if not ff.recipes:
        return md + ["No fixed recipe was measured in this run (`--recipes none`, or a run made before the "
                     "yardstick): there is nothing to compare acf's candidates with.", ""]
    md += [f"The yardstick: {len(measured)} fixed recipes measured with this run's evaluator, items and calibration "
           f"({', '.join(f'`{c.id[2:]}`' for c in measured)})"
           + (f"; failed: {', '.join(f'`{c.id[2:]}` ({c.reason})' for c in ff.recipes if c.status != 'ok')}"
              if any(c.status != "ok" for c in ff.recipes) else "")
           + ". At each size of the recipes' own frontier (no recipe is better at no larger size), acf's most faithful "
             "candidate no larger than it. Ratios are acf / recipe (below 1: acf is less damaged); intervals are "
             "paired bootstrap 95% intervals over items. Sizes are the weight files on disk (safetensors or GGUF).",
           ""]
    rows = []
    for h in headline(ff):
        rows.append([f"`{h['recipe'][2:]}` ({h['recipe_size'] / 2**20:.1f} MiB)",
                     "–" if h["acf"] is None
                     else f"`{h['acf']}` {h['acf_strategy']} ({h['acf_size'] / 2**20:.1f} MiB)"]
                    + [_fmt_cmp(h["comparisons"][label]) for label, _, _ in COMPARISONS])
    md += [table(["best recipe at this size", "acf's best at no larger size"] + [c[0] for c in COMPARISONS], rows),
           ""]
    refused = [c.id[2:] for c in measured if vllm_refuses(c)]
    if refused:
        md += [f"vLLM would refuse {', '.join(f'`{r}`' for r in refused)} (checked by rules read from vLLM's "
               "source, not loaded: `acf check-deploy`); a user serving with vLLM cannot pick them.", ""]
    return md


def vllm_refuses(c: Candidate) -> bool:
    """Whether a step of the candidate recorded an output that breaks vLLM's loader rules (uniform outputs record
    `deploy_check`, mixed ones record it inside `mixed_precision`)."""
    for s in c.steps or []:
        extra = getattr(s, "extra", None) or {}
        check = extra.get("deploy_check") or (extra.get("mixed_precision") or {}).get("deploy_check")
        if check is not None and not check.get("conforms", True):
            return True
    return False
