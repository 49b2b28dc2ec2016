"""The run's own stages, around its episodes: set the run up (`init_run`: model, spec, study, seeds), measure the
baseline and the yardstick's recipes (`ensure_baseline`), say when the search stops (`stop_reason`) and measure the
frontier on held-out items (`final_evaluation`). The coordinator graph (acf.coordinator.graph) makes each a node;
the episodes between them are acf.coordinator.episode's, a trial's proposal, record and close
acf.coordinator.trial's.

Each reads and writes the run directory through `RunContext`, so a process killed at any point resumes from disk
(the Optuna study, frontier.json derived from it) plus the LangGraph checkpoint. The baseline's measurement is in
`acf.coordinator.baseline`, the recipes' in `acf.coordinator.yardstick`, which items and metrics a run evaluates in
`acf.coordinator.run_eval`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from acf import __version__
from acf.core.provenance import device_string, git_commit, runtime_string
from acf.coordinator.episode import sparsity_from_steps
from acf.coordinator.records import metrics_line
from acf.coordinator.run_context import RunConfig, RunContext
from acf.coordinator.run_eval import evaluate_in_run
from acf.coordinator.run_store import has_run, put_baseline, put_final, put_run, save_run
from acf.coordinator.state import FrontierFile, RunMeta, episodes_recorded, now
from acf.core.objectives import DIRECTIONS
from acf.search.pareto import frontier_stalled


def init_run(ctx: RunContext) -> dict:
    """Resolve the model, infer its spec, create the study (the run's store) and frontier.json; seed known-good
    recipes."""
    from acf.models.loading import resolve_model
    from acf.models.spec import infer_spec, save_spec

    from acf.search.recipes import select

    cfg = ctx.cfg
    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    select(spec, cfg.runtime, {}, cfg.recipes)   # a recipe this model does not admit is refused before any work
    ctx.dir.mkdir(parents=True, exist_ok=True)
    save_spec(spec, ctx.dir / "model_spec.json")
    ctx.spec = spec
    study = ctx.study
    if not has_run(study):
        meta = run_meta(cfg, str(model_path), ctx.dir.name)
        from acf.models.spec import spec_summary

        put_run(study, cfg, meta, spec_summary(spec))
    save_run(ctx)
    if not study.trials:
        from acf.search.space import enqueue_first

        enqueue_first(study, ctx.space, cfg.sampler)
    ctx.say(f"[bold]model[/] {cfg.model} ({spec.params / 1e6:.1f}M params, {spec.num_layers} layers, valid group "
            f"sizes {spec.valid_group_sizes}) · [bold]task[/] {cfg.dataset} · [bold]objectives[/] "
            f"{', '.join(cfg.objectives)} · [bold]device[/] {device_string(cfg.device)}")
    return {"model_path": str(model_path)}


def ensure_baseline(ctx: RunContext, model_path: str) -> None:
    """The baseline, measured once per run and stored in the study (a resumed run keeps its measurement); then the
    yardstick's fixed recipes (acf.coordinator.yardstick), measured or read from the recipe cache."""
    from acf.coordinator.baseline import evaluate_baseline
    from acf.coordinator.yardstick import ensure_recipes

    assert ctx.ff is not None
    if ctx.ff.baseline is None:
        put_baseline(ctx.study, evaluate_baseline(ctx, model_path))
        save_run(ctx)
    ensure_recipes(ctx, model_path)


def run_meta(cfg: RunConfig, model_path: str, run_id: str) -> RunMeta:
    """frontier.json's `run` section for a new run (a single process's or a shared study's)."""
    return RunMeta(run_id=run_id, model=cfg.model, model_path=model_path, dataset=cfg.dataset,
                   objectives=cfg.objectives, directions={o: DIRECTIONS[o] for o in cfg.objectives},
                   preset=cfg.preset, min_retention=cfg.min_retention, sampler=cfg.sampler, seed=cfg.seed,
                   limit=cfg.limit, proxy_limit=cfg.proxy_limit, episodes=cfg.episodes, device=cfg.device,
                   device_name=device_string(cfg.device), acf_version=__version__, git_commit=git_commit(),
                   runtime=runtime_string(), created_at=now(), updated_at=now(), command=cfg.command,
                   study_name=cfg.study(), storage=redact(cfg.storage_url()), max_kld=cfg.max_kld,
                   item_sets=item_sets(cfg))


def item_sets(cfg: RunConfig) -> dict[str, Any]:
    """What frontier.json says about which items rank candidates and which the report uses (disjoint)."""
    lim = cfg.limit
    own = {"dataset_split": cfg.dataset_split} if cfg.dataset_split else {}
    return {**own, "split": "test", "permutation_seed": cfg.seed,
            "search": {"offset": 0, "count": lim, "proxy_count": cfg.proxy_limit,
                       "use": "ranks candidates (proxy = its first proxy_count items)"},
            "report": {"offset": lim or 0, "count": cfg.final_limit,
                       "use": "final evaluation of frontier members (--final-limit), never seen by the search"},
            "calibration_and_training": "train split, in the prompt format evaluation uses"}


def redact(url: str) -> str:
    """Storage URLs may carry a password; it never reaches frontier.json or logs."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def stop_reason(cfg: RunConfig, ff: FrontierFile, seconds: float) -> Optional[str]:
    """Why the search stops (None: it goes on): its episodes are done, its time budget is used by `seconds` of wall
    time so far (`RunContext.run_seconds`; a shared study's counts from its start), or the frontier stalled."""
    if episodes_recorded(ff) >= cfg.episodes:
        return f"episodes: {cfg.episodes} done"
    if cfg.budget_minutes is not None and seconds >= cfg.budget_minutes * 60:
        return f"time budget of {cfg.budget_minutes:g} min used"
    if cfg.patience is not None and frontier_stalled([c.id for c in ff.candidates], ff.frontier, cfg.patience):
        return f"patience: frontier unchanged for {cfg.patience} episodes"
    return None


def final_evaluation(ctx: RunContext) -> None:
    """Measure the baseline, every frontier member, the recipes of the recipe frontier with acf's best candidate at
    each of their sizes (the report's headline), and the controls of these on --final-limit held-out items.

    These items come after the search items in the test split's permutation: the search never saw them, so the
    numbers a user quotes are not selected on the items they are measured on. Already-done members are skipped,
    so a resumed run does not redo them; a recipe's held-out figures also go into the recipe cache.
    """
    from acf.coordinator.yardstick import final_metric_names, remember_final

    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None
    if not cfg.final_limit:
        return
    metrics = final_metric_names(ctx)
    offset, _ = ctx.item_range("report")
    from acf.evaluation.runner import eval_items

    n = len(eval_items(ctx.task, cfg.final_limit, cfg.seed, offset))
    if n == 0:
        ctx.say(f"[yellow]final evaluation skipped[/]: the test split has no items left after the {cfg.limit} "
                f"search items (lower --limit to hold some out)")
        return
    ids = ["baseline"] + [c for c in ff.frontier if c != "baseline"] + ff.headline_ids()
    recipe = ff.best_fixed_recipe()
    ids += [recipe.id] if recipe is not None else []
    ids += [c.control for c in (ff.candidate(i) for i in ids) if c.control]
    recipes = {c.id for c in ff.recipes}
    for cid in dict.fromkeys(ids):
        c = ff.candidate(cid)
        if c.final_metrics or not c.artifact or not Path(c.artifact).exists():
            continue
        ctx.say(f"[bold]final evaluation[/] of {cid} on {n} held-out items (test items {offset}..{offset + n - 1} "
                f"of the permutation): {', '.join(metrics)}")
        t0 = time.time()
        res = evaluate_in_run(ctx, Path(c.artifact), metrics, cfg.final_limit, part="report",
                        known_sparsity=sparsity_from_steps(c.strategy, c.steps))
        put_final(ctx.study, cid, res.metrics, time.time() - t0)
        if cid in recipes:
            remember_final(ctx, cid, res.metrics, time.time() - t0)
        ctx.say(metrics_line(cid, res.metrics, metrics))
        save_run(ctx)
