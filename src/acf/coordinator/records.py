"""Scoring an episode's outcome: objectives and reward against the baseline (`score`), the Pareto front,
hypervolume and recommended pick (`refresh_frontier`), and what the console shows of it. Pure of compression,
evaluation and storage (`acf.coordinator.run_store` stores and derives through these functions, the Optuna tell is
`acf.coordinator.trial`'s), so every recorder (the graph's episode, a distributed worker, a study rebuild) scores
alike. Scoring takes what it reads (the config, the frontier), never the whole run."""

from __future__ import annotations

from typing import Optional

from acf.search.pareto import hypervolume, pareto_front, reference_point
from acf.core.metrics import display, logged
from acf.core.provenance import Measurement
from acf.search.reward import recommend, retention, reward
from acf.coordinator.run_context import RunConfig, RunContext
from acf.coordinator.state import Candidate, FrontierFile, HVPoint, Recommendation, episodes_recorded


def objective_values(objectives: list[str], metrics: dict[str, Measurement]) -> dict[str, float]:
    return {o: metrics[o].value for o in objectives if o in metrics and metrics[o].value is not None}


def metrics_line(label: str, metrics: dict[str, Measurement], objectives: list[str]) -> str:
    parts = []
    for o in list(dict.fromkeys(objectives + list(logged()))):
        m = metrics.get(o)
        if m is None or m.value is None:
            continue
        parts.append(f"{o}={fmt_value(o, m.value)}")
    return f"  [dim]{label}:[/] " + " · ".join(parts)


def fmt_value(name: str, v: float) -> str:
    return display(name, v)


def ok_candidates(ff: FrontierFile) -> list[Candidate]:
    """The baseline (once measured) and every ok candidate: what the frontier is drawn from."""
    out = [c for c in ff.candidates if c.status == "ok"]
    if ff.baseline is not None:
        out = [ff.baseline] + out
    return out


def kld_of(cand: Candidate) -> Optional[float]:
    m = cand.metrics.get("kld")
    return None if m is None else m.value


def score(cfg: RunConfig, base: dict[str, float], cand: Candidate) -> None:
    """An ok candidate's objectives, retention and reward against the baseline's objectives `base`; one without a
    value for every objective is failed. One function for every recorder (frontier.json here, a trial's record in
    acf.distributed), so both score alike."""
    if cand.status != "ok":
        return
    cand.objectives = objective_values(cfg.objectives, cand.metrics)
    if len(cand.objectives) == len(cfg.objectives):
        cand.retention = retention(cand.objectives, base, cfg.objectives)
        cand.reward = reward(cand.objectives, base, cfg.objectives, cfg.preset, cfg.min_retention, cfg.max_kld,
                             kld_of(cand)).reward
    else:
        cand.status, cand.reason = "failed", "evaluation produced no value for " + ", ".join(
            o for o in cfg.objectives if o not in cand.objectives)


def refresh_frontier(cfg: RunConfig, ff: FrontierFile) -> None:
    """Recompute frontier ids, hypervolume history and the recommended pick from the recorded candidates."""
    assert ff.baseline is not None
    objs = cfg.objectives
    points = {c.id: c.objectives for c in ok_candidates(ff) if len(c.objectives) == len(objs)}
    ff.frontier = pareto_front(points, objs)
    base = ff.baseline.objectives
    if len(base) == len(objs):
        ref = reference_point(base, objs, fixed={"kld": cfg.max_kld} if cfg.max_kld else None)
        ff.reference_point = ref
        hv = hypervolume([points[k] for k in ff.frontier], objs, ref, normalise=base)
        ep = episodes_recorded(ff)
        ff.hypervolume = [h for h in ff.hypervolume if h.episode != ep] + [HVPoint(episode=ep, hypervolume=hv)]
        klds = {c.id: kld_of(c) for c in ok_candidates(ff)}
        rec = recommend(points, [k for k in ff.frontier], base, objs, cfg.preset, cfg.min_retention,
                        cfg.max_kld, klds)
        if rec is not None:
            cid, r = rec
            ff.recommended = Recommendation(id=cid, reward=r.reward, terms=r.terms, preset=cfg.preset,
                                            why=why(cid, r, cfg.min_retention))
    for c in ff.candidates:
        if c.status == "ok" and len(c.objectives) == len(objs):
            c.reward = reward(c.objectives, base, objs, cfg.preset, cfg.min_retention, cfg.max_kld,
                              kld_of(c)).reward


def why(cid: str, r, min_ret: Optional[float]) -> str:
    parts = [f"{k}: {v:+.3f}" for k, v in sorted(r.terms.items(), key=lambda kv: -abs(kv[1]))]
    s = f"highest {('feasible ' if r.feasible else '')}reward on the frontier ({r.reward:.3f} = " + ", ".join(parts)
    if r.penalty:
        s += f", minus penalty {r.penalty:.3f} for retention {r.retention:.3f} < {min_ret}"
    return s + ")"


def frontier_table(ctx: RunContext):
    from rich.table import Table

    ff = ctx.ff
    assert ff is not None
    t = Table(title=f"Frontier after {episodes_recorded(ff)} episodes ({len(ff.frontier)} members)")
    t.add_column("id")
    t.add_column("strategy", overflow="fold")
    cols = list(dict.fromkeys(ctx.cfg.objectives + ["answer_nll", "size"]))
    for o in cols:
        t.add_column(o, justify="right")
    t.add_column("retention", justify="right")
    t.add_column("reward", justify="right")
    for cid in ff.frontier:
        c = ff.candidate(cid)
        mark = " ★" if ff.recommended and ff.recommended.id == cid else ""
        t.add_row(cid + mark, c.description or c.strategy.describe(),
                  *[fmt_value(o, c.metrics[o].value) if o in c.metrics and c.metrics[o].value is not None else "-"
                    for o in cols],
                  f"{c.retention:.3f}" if c.retention is not None else "-",
                  f"{c.reward:.3f}" if c.reward is not None else "-")
    return t
