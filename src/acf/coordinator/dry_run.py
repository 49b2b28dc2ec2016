"""`acf run --dry-run`: everything a run would check before its first model load, and what it would then do.

It validates the settings, the task (a dataset file is read and every row checked) and the model directory (config,
tokenizer, weight files' headers), infers the spec on the meta device (no weights are read), and describes the run:
the search space, the seeds tried first, the fixed recipes the yardstick would measure, and the estimated time and
peak memory of each seed's steps (the registry's cost and memory models: estimates, not measurements). Nothing is
written: no run directory, no study.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from acf.coordinator.preflight import StepEstimate, step_estimates
from acf.coordinator.run_context import RunConfig, RunContext, task_for, validate_config
from acf.methods.strategy import Strategy

GiB = 2 ** 30


@dataclass
class Planned:
    """A strategy the run would measure (a seed or a recipe) with its per-step estimates, or why it is invalid."""

    name: str
    strategy: Optional[Strategy]
    steps: list[StepEstimate] = field(default_factory=list)
    problem: Optional[str] = None


@dataclass
class DryRun:
    cfg: RunConfig
    model_path: Path
    ctx: RunContext
    first: str                                   # "seeds", or "grid" with --sampler grid
    seeds: list[Planned]
    recipes: list[Planned]
    resume: bool = False


def plan_run(cfg: RunConfig, resume: bool = False) -> DryRun:
    """Validate `cfg` as `Pipeline` would and plan its first trials; raises the same one-line errors."""
    import optuna

    from acf.coordinator.yardstick import recipe_strategies
    from acf.models.loading import resolve_device, resolve_model
    from acf.models.spec import infer_spec
    from acf.search.recipes import select

    validate_config(cfg, task_for(cfg).metrics)
    cfg.device = resolve_device(cfg.device)
    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    select(spec, cfg.runtime, {}, cfg.recipes)
    from rich.console import Console

    ctx = RunContext(cfg, Console(quiet=True), spec=spec)   # the spec init_run would save, kept in memory
    first = "grid" if cfg.sampler == "grid" else "seeds"
    params = ctx.space.grid() if first == "grid" else ctx.space.seeds()
    seeds = [_planned(ctx, f"{i}", lambda p=p: ctx.space.suggest(optuna.trial.FixedTrial(p)))
             for i, p in enumerate(params, 1)]
    recipes = [_planned(ctx, name, lambda s=s: s) for name, s in recipe_strategies(ctx).items()]
    return DryRun(cfg=cfg, model_path=model_path, ctx=ctx, first=first, seeds=seeds, recipes=recipes, resume=resume)


def _planned(ctx: RunContext, name: str, make) -> Planned:
    from acf.core.errors import StrategyError
    from acf.methods.strategy import validate_strategy

    try:
        strategy = validate_strategy(make(), ctx.spec, ctx.cfg.device)
    except StrategyError as e:
        return Planned(name, None, problem=str(e))
    return Planned(name, strategy, step_estimates(ctx, strategy))


def _bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.0f} MiB"


def _mem(e: StepEstimate) -> str:
    return _bytes(e.memory.total) if e.memory is not None else "no memory model"


def _planned_lines(p: Planned, label: str) -> list[str]:
    if p.strategy is None:
        return [f"  {label}: invalid ({p.problem})"]
    total = sum(e.seconds for e in p.steps)
    peak = max((e.memory.total for e in p.steps if e.memory is not None), default=None)
    head = f"  {label}: {p.strategy.describe()}"
    est = (f"      estimated: ~{total:.0f} s to compress"
           + (f", peak memory ~{_bytes(peak)}" if peak is not None else ""))
    per = "      per step: " + "; ".join(f"{e.method} ~{e.seconds:.0f} s, {_mem(e)}" for e in p.steps)
    return [head, est, per]


def _items_note(cfg: RunConfig, n_test: int) -> str:
    """Where the test split is smaller than the settings assume (a small file of your own)."""
    search = min(cfg.limit or n_test, n_test)
    if cfg.limit and cfg.limit > n_test:
        return f" (note: only {n_test} test items, so the search uses {search} and none are left for a report)"
    if cfg.final_limit and search + cfg.final_limit > n_test:
        return f" (note: only {n_test - search} test items are left after the search for the report)"
    return ""


def render(plan: DryRun) -> list[str]:
    """The dry run as plain lines (the CLI prints them)."""
    cfg, ctx = plan.cfg, plan.ctx
    spec, space, task = ctx.spec, ctx.space, ctx.task
    n_test, n_train = len(task.load("test", limit=None, seed=None)), len(task.load("train", limit=None, seed=None))
    where = f"resume {cfg.run_dir}" if plan.resume else f"a run would write {cfg.run_dir}"
    out = [f"dry run: settings checked; nothing written and no model weights loaded ({where})",
           f"model: {cfg.model} -> {plan.model_path} ({spec.params / 1e6:.1f}M params, {spec.num_layers} layers, "
           f"valid group sizes {spec.valid_group_sizes}) · device {cfg.device} · runtime {cfg.runtime}"]
    own = ""
    if cfg.dataset_sha256:
        s = cfg.dataset_split or {}
        own = (f" (your file, sha256 {cfg.dataset_sha256[:16]}..., {s.get('rows')} rows: {s.get('train')} train / "
               f"{s.get('test')} test at train share {cfg.train_share}; scorer {cfg.scorer or 'none'})")
    out += [f"task: {task.name}{own}: {n_test} test items, {n_train} train items; metrics {', '.join(task.metrics)}",
            f"calibration: {cfg.calib_samples} samples of {cfg.seq_len} tokens from "
            + (f"--calib-data {cfg.calib_data} (sha256 {(cfg.calib_data_sha256 or '')[:16]}..., "
               f"{len(ctx.calib_task.calib.texts)} texts)" if cfg.calib_data else f"{task.name}'s train split")
            + (f", {cfg.calib_mix:.0%} of them general text" if cfg.calib_mix else ""),
            f"items: search {cfg.limit or 'all'} (proxy {cfg.proxy_limit or 'none'}), report "
            f"{cfg.final_limit or 'none'}; seed {cfg.seed}" + _items_note(cfg, n_test),
            f"objectives: {', '.join(cfg.objectives)} · max kld {cfg.max_kld} · min retention {cfg.min_retention} · "
            f"sampler {cfg.sampler} · episodes {cfg.episodes}", "", "search space (methods per slot):",
            f"  prune:   {', '.join(space.prune_methods)}",
            f"  recover: {', '.join(space.recover_methods)} (after pruning; steps {', '.join(map(str, space.recover_steps))})",
            f"  quant:   {', '.join(space.quant_methods)}",
            f"  tune:    {', '.join(space.tune_methods)} (after a weight-only quantizer; steps "
            f"{', '.join(map(str, space.tune_steps))})"]
    if space.budget_range is not None:
        lo, hi, step = space.budget_range
        out.append(f"  budget:  {lo:g}..{hi:g} bits per weight in steps of {step:g} (per-layer allocation), or uniform")
    else:
        out.append(f"  budget:  uniform only ({', '.join(space.precisions)})")
    if "gguf" in space.quant_methods:
        rng = space.gguf_budget_range
        out.append(f"  gguf:    types {', '.join(space.gguf_types)}"
                   + (f"; per-tensor budget {rng[0]:g}..{rng[1]:g} bits in steps of {rng[2]:g}" if rng else ""))
    out.append(f"  group sizes: {', '.join(space.group_sizes)}")
    what = "the preset grid (--sampler grid), in order" if plan.first == "grid" else "seeds, tried first in order"
    out += ["", f"{what}: {len(plan.seeds)}"] + (["  (none in this space)"] if not plan.seeds else [])
    for p in plan.seeds:
        out += _planned_lines(p, f"seed {p.name}")
    out += ["", f"recipes the yardstick would measure before the first episode (or read from the recipe cache): "
                f"{len(plan.recipes)}"] + (["  (none: --recipes none)"] if not plan.recipes else [])
    for p in plan.recipes:
        out += _planned_lines(p, p.name)
    out += ["", "time and memory are ESTIMATES from parameter counts and step settings (acf.methods.registry's cost "
                "and memory models, as preflight uses them), not measurements; evaluation time is not included."]
    return out


def describe(plan: DryRun) -> dict[str, Any]:
    """The same as data (tests, scripts)."""
    return {"seeds": [p.strategy.describe() if p.strategy else p.problem for p in plan.seeds],
            "recipes": [p.name for p in plan.recipes]}
