"""What each episode step does: the logic behind the coordinator graph's nodes (propose, compress, proxy decision,
controls, final evaluation).

The graph (`acf.coordinator.graph`) only routes between these functions. Each function reads and writes the run
directory through `RunContext`, so a process killed at any point resumes from disk (frontier.json, the
Optuna study) plus the LangGraph checkpoint, losing at most the episode in flight. The baseline's measurement is
in `acf.coordinator.baseline`, recording an outcome (frontier, Optuna tell, reward) in `acf.coordinator.records`,
which items and metrics a run evaluates in `acf.coordinator.run_eval`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import optuna

from acf import __version__
from acf.coordinator import run_store as RS
from acf.core.errors import AcfError, StrategyError
from acf.core.objectives import DIRECTIONS, QUALITY
from acf.core.provenance import Measurement, device_string, git_commit, runtime_string
from acf.coordinator.records import episodes_done, metrics_line, ok_candidates, run_objective_values, tell_like
from acf.search.pareto import frontier_stalled
from acf.search.reward import retention
from acf.coordinator.run_context import RUNTIME_METRICS, RunConfig, RunContext
from acf.coordinator.run_eval import evaluate_in_run, metrics_to_measure
from acf.coordinator.compression import compress  # noqa: F401  (episode stages call it as pipeline.compress)
from acf.coordinator.state import Candidate, RunMeta, now
from acf.methods.strategy import Strategy, validate_strategy

log = logging.getLogger(__name__)


# ---- nodes' logic ----------------------------------------------------------------------------------------

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
    ctx._spec = spec
    study = ctx.study
    if not RS.has_run(study):
        meta = run_meta(cfg, str(model_path), ctx.dir.name)
        from acf.models.spec import spec_summary

        RS.put_run(study, cfg, meta, spec_summary(spec))
    RS.save_run(ctx)
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
        RS.put_baseline(ctx.study, evaluate_baseline(ctx, model_path))
        RS.save_run(ctx)
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


def stop_reason(ctx: RunContext) -> Optional[str]:
    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None
    if episodes_done(ctx) >= cfg.episodes:
        return f"episodes: {cfg.episodes} done"
    if cfg.budget_minutes is not None and ff.run.wall_seconds + (time.time() - ctx.t_start) >= cfg.budget_minutes * 60:
        return f"time budget of {cfg.budget_minutes:g} min used"
    if cfg.patience is not None and frontier_stalled([c.id for c in ff.candidates], ff.frontier, cfg.patience):
        return f"patience: frontier unchanged for {cfg.patience} episodes"
    return None


def propose(ctx: RunContext) -> dict:
    """Ask Optuna (or the planner) for the next strategy. Duplicates of evaluated strategies are told the earlier
    result at once (the sampler learns, no compute is spent) and asked again."""
    assert ctx.ff is not None
    episode = episodes_done(ctx) + 1
    t0 = time.time()
    started = {"t0_epoch": t0, "t0": now()}
    if ctx.planner is not None and ctx.planner.wants_turn(episode, ctx):
        prop = ctx.planner.propose(ctx)
        if prop is not None:
            return {**prop, **started, "episode": episode, "t_propose": round(time.time() - t0, 3)}
    from acf.coordinator import screening as SC

    study = ctx.study
    screens = 0
    for attempt in range(50 + SC.MAX_SCREENS):
        # aimed on its first attempts; a space where the aim keeps repeating evaluated strategies samples freely
        if attempt < 3 and not _waiting_aim(study):
            SC.enqueue_aim(ctx, episode)
        trial = study.ask()
        strategy = ctx.space.suggest(trial)
        proposed_by = _proposer(ctx, trial)
        aim = SC.aim_of(study, trial.number)
        try:
            strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
        except StrategyError as e:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return {**started, "episode": episode, "trial": trial.number, "strategy": strategy.model_dump(),
                    "proposed_by": proposed_by, "rejected": str(e), "t_propose": round(time.time() - t0, 3)}
        prev = evaluated_twin(ctx, strategy)
        if prev is not None:
            tell_like(ctx, trial, prev)
            continue
        pred, screened = SC.assess(ctx, trial, strategy, proposed_by, screenable=proposed_by.startswith("optuna"),
                                   screens_so_far=screens)
        if screened is not None:
            screens += 1
            continue
        return {**started, "episode": episode, "trial": trial.number, "strategy": strategy.model_dump(),
                "proposed_by": proposed_by, "prediction": pred.model_dump(mode="json"), "aim": aim,
                "t_propose": round(time.time() - t0, 3)}
    raise AcfError(f"the search space is exhausted: {50 + SC.MAX_SCREENS} proposals in a row repeated evaluated "
                   f"strategies or were screened out")


def _waiting_aim(study: optuna.Study) -> bool:
    """An aimed trial enqueued earlier and not asked yet (a resume after it was enqueued): not enqueued twice."""
    from acf.coordinator.screening import T_AIM

    return any(T_AIM in t.user_attrs for t in study.get_trials(deepcopy=False,
                                                                states=(optuna.trial.TrialState.WAITING,)))


def evaluated_twin(ctx: RunContext, strategy: Strategy) -> Optional[Candidate]:
    """The latest candidate evaluated (ok, pruned or failed) with this strategy: a repeat proposal is told its
    result (the sampler learns, no compute is spent) instead of running again."""
    assert ctx.ff is not None
    key = strategy.key()
    return next((c for c in reversed(ctx.ff.candidates)
                 if c.status in ("ok", "pruned", "failed") and c.strategy.key() == key), None)


def _proposer(ctx: RunContext, trial: optuna.Trial) -> str:
    # Optuna 5's Trial has no system_attrs; the stored trial does (enqueued trials carry fixed_params).
    from acf.coordinator.screening import T_AIM

    t = ctx.study.get_trials(deepcopy=False)[trial.number]
    aim = t.user_attrs.get(T_AIM)
    if aim:
        gap = "acf has nothing that small" if aim.get("ratio") is None else f"acf at {aim['ratio']:.2f}x its kld"
        return (f"optuna:{ctx.cfg.sampler} aimed at {aim['size'] / 2**20:.1f} MiB (budget {aim['budget']} bits; "
                f"{aim['recipe_id']}: {gap})")
    if t.system_attrs.get("fixed_params"):
        return "seed recipe" if ctx.cfg.sampler != "grid" else "preset grid"
    return f"optuna:{ctx.cfg.sampler}"


def sparsity_from_steps(strategy: Strategy, steps: list) -> Optional[Measurement]:
    """For a quantized result: the sparsity its pruning steps measured before quantization (0 without one)."""
    from acf.methods.strategy import kind_of

    if not any(kind_of(s.method) == "quantize" for s in strategy.steps):
        return None
    measured = None
    for r in steps:
        extra = r.get("extra", {}) if isinstance(r, dict) else r.extra
        method = r.get("method") if isinstance(r, dict) else r.method
        if "measured_sparsity" in extra:
            measured = (float(extra["measured_sparsity"]), method)
    if measured is None:
        return Measurement(value=0.0, unit="fraction", device="", method="no pruning step: no sparsity (the exact "
                                                                         "zeros of a quantized grid are not sparsity)")
    return Measurement(value=measured[0], unit="fraction", device="",
                       method=f"share of exact zeros in Linear weights measured after the {measured[1]} step, before "
                              f"quantization (a dequantized grid's zeros are not counted)")


def proxy_decision(ctx: RunContext, cid: str) -> tuple[dict[str, Measurement], Optional[str]]:
    """Cheap evaluation on --proxy-limit items; returns (proxy metrics, prune reason or None)."""
    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None and ff.baseline is not None
    q = [m for m in cfg.objectives if m in QUALITY]
    if not cfg.proxy_limit or not q or not ff.baseline.proxy_metrics:
        return {}, None
    art = ctx.artifact_dir(cid)
    res = evaluate_in_run(ctx, art, q + ["size"], cfg.proxy_limit, loaded=ctx.loaded(cid, art))
    base = {o: ff.baseline.proxy_metrics[o].value for o in q if o in ff.baseline.proxy_metrics}
    vals = {o: res.metrics[o].value for o in q}
    ret = retention(vals, base, cfg.objectives)
    if ret is not None and cfg.min_retention is not None and ret < cfg.min_retention - 0.1:
        return res.metrics, (f"proxy retention {ret:.3f} on {cfg.proxy_limit} items is far below the "
                             f"--min-retention {cfg.min_retention} (margin 0.1)")
    pk = vals.get("kld")
    if pk is not None and cfg.max_kld is not None and pk > 2 * cfg.max_kld:
        return res.metrics, (f"proxy kld {pk:.3f} on {cfg.proxy_limit} items is more than twice the --max-kld "
                             f"{cfg.max_kld}")
    # Optimistic full-evaluation estimate: quality 5% better than the proxy, costs not yet measured as ideal.
    est: dict[str, float] = {}
    for o in cfg.objectives:
        if o in q:
            v = vals[o]
            est[o] = v * 0.95 if DIRECTIONS[o] == "minimize" else v * 1.05 + 0.02
        elif o == "size":
            est[o] = res.metrics["size"].value
        else:
            est[o] = 0.0 if DIRECTIONS[o] == "minimize" else math.inf
    # Proxy quality of frontier members is compared on the same proxy items.
    from acf.search.pareto import dominates

    for c in ok_candidates(ctx):
        if c.id not in ff.frontier or not c.proxy_metrics:
            continue
        other = dict(c.objectives)
        for o in q:
            if o in c.proxy_metrics and c.proxy_metrics[o].value is not None:
                other[o] = c.proxy_metrics[o].value
        if all(o in other for o in cfg.objectives) and dominates(other, est, cfg.objectives):
            return res.metrics, f"dominated by {c.id} even with an optimistic estimate from the proxy evaluation"
    return res.metrics, None


def ensure_control(ctx: RunContext, strategy: Strategy) -> Optional[str]:
    """The control row for a strategy with recovery steps: the uncompressed model given the same recovery
    (LoRA/distillation steps and their params) and no compression, measured once per distinct recovery and
    reused. Its quality change is task adaptation; the candidate's change beyond it is compression.
    Returns the control's id (None when the strategy has no recovery step)."""
    ff = ctx.ff
    assert ff is not None
    from acf.methods.strategy import kind_of

    rec = [st for st in strategy.steps if kind_of(st.method) in ("lora", "distill") and not st.params.get("qlora")]
    if not rec:
        return None
    cs = Strategy(steps=rec)
    for c in ff.controls:
        if c.strategy.key() == cs.key():
            return c.id
    cid = f"ctrl{len(ff.controls) + 1:02d}"
    ctx.say(f"  [bold]control[/] {cid}: baseline + {cs.describe()} (no compression), to measure task adaptation "
            f"apart")
    t0 = time.time()
    records, err = compress(ctx, cid, cs, ff.run.model_path, 0, log_dir=ctx.dir / "controls" / cid / "logs")
    cand = Candidate(id=cid, episode=0, strategy=cs, description=cs.describe() + " (control: no compression)",
                     proposed_by="control", steps=records, started_at=now())
    art = ctx.artifact_dir(cid)
    if err:
        cand.status, cand.reason = "failed", err
    else:
        try:
            res = evaluate_in_run(ctx, art, [m for m in metrics_to_measure(ctx) if m not in RUNTIME_METRICS],
                            ctx.cfg.limit)
            cand.metrics = res.metrics
            cand.objectives = run_objective_values(ctx, res.metrics)
            cand.retention = retention(cand.objectives, ff.baseline.objectives, ctx.cfg.objectives)
        except (KeyboardInterrupt, AcfError):
            raise
        except Exception as e:  # noqa: BLE001 - a failed control leaves the candidate without its split
            cand.status, cand.reason = "failed", f"evaluation: {type(e).__name__}: {str(e)[:300]}"
    cand.timings = {"control": round(time.time() - t0, 2)}
    cand.finished_at = now()
    cand.artifact = str(art) if art.exists() and cand.status == "ok" else None
    cand.artifact_kept = cand.artifact is not None
    if cand.status != "ok" or not (ctx.cfg.keep_all or ctx.cfg.final_limit):
        shutil.rmtree(art, ignore_errors=True)
        cand.artifact, cand.artifact_kept = None, False
    RS.put_control(ctx.study, cand)
    RS.save_run(ctx)
    ctx.say(metrics_line(cid, cand.metrics, ctx.cfg.objectives) if cand.status == "ok"
            else f"  [red]control {cid} failed[/]: {cand.reason}")
    return cid


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
        RS.put_final(ctx.study, cid, res.metrics, time.time() - t0)
        if cid in recipes:
            remember_final(ctx, cid, res.metrics, time.time() - t0)
        ctx.say(metrics_line(cid, res.metrics, metrics))
        RS.save_run(ctx)


def full_evaluation(ctx: RunContext, cid: str, known_sparsity: Optional[Measurement] = None):
    art = ctx.artifact_dir(cid)
    return evaluate_in_run(ctx, art, metrics_to_measure(ctx), ctx.cfg.limit, loaded=ctx.loaded(cid, art),
                     known_sparsity=known_sparsity)


