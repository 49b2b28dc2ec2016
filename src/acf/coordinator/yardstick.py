"""The yardstick: every fixed recipe of the run's format (acf.search.recipes), measured once per model, task,
items and calibration, before the search, and cached so a resumed run and later runs reuse it.

Why before the search and apart from it: every number acf reports is "against the best fixed recipe at that size",
so the recipes must all be measured, with the run's own evaluator, items and calibration, and they must not use the
user's episodes (a dozen episodes spent on recipes a user could run by hand find nothing new).

The cache lives beside the other per-model caches (`$ACF_CACHE/recipes/<key>/`): one JSON record per recipe (the
candidate as measured, plus its held-out measurements keyed by the report's settings) and the model folders of the
recipes on the recipe frontier (the report measures those held out; the others' models are deleted once measured).
The key names everything a measurement depends on: the weights' digest, the task and its search items, the
calibration (samples, length, general-text share), the device kind, the runtime and the metric set. Records are
written atomically; two runs sharing a cache at once each measure what is missing and the last record written wins
(both are measurements of the same thing).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from acf.core.atomic import write_text
from acf.core.errors import AcfError
from acf.core.metrics import names
from acf.core.provenance import Measurement
from acf.coordinator.run_store import put_final, put_recipe, save_run
from acf.coordinator.compression import compress
from acf.coordinator.records import metrics_line, objective_values
from acf.coordinator.run_context import RunContext
from acf.coordinator.run_eval import evaluate_in_run, metrics_to_measure
from acf.coordinator.state import Candidate, now
from acf.methods.strategy import Strategy, validate_strategy
from acf.search.recipes import RECIPES_VERSION, recipe_id, select


def recipe_strategies(ctx: RunContext) -> dict[str, Strategy]:
    """The run's recipes (`--recipes`, default: all the model admits), validated like any strategy."""
    cfg = ctx.cfg
    calib = {"calib_samples": cfg.calib_samples, "seq_len": cfg.seq_len}
    return {name: validate_strategy(s, ctx.spec, cfg.device)
            for name, s in select(ctx.spec, cfg.runtime, calib, cfg.recipes).items()}


def cache_key(ctx: RunContext, model_path: str) -> tuple[str, dict[str, Any]]:
    """(key, what it is made of): a measurement is reused only where all of it is the same."""
    from acf.core.stats import items_digest
    from acf.evaluation.runner import eval_items
    from acf.methods.sensitivity_cache import weights_digest

    cfg = ctx.cfg
    items = eval_items(ctx.task, cfg.limit, cfg.seed, 0)
    parts = {"recipes_version": RECIPES_VERSION, "weights": weights_digest(Path(model_path)), "task": cfg.dataset,
             "items": items_digest([it.id for it in items]), "limit": cfg.limit, "seed": cfg.seed,
             "calibration": {"samples": cfg.calib_samples, "seq_len": cfg.seq_len, "general_share": cfg.calib_mix},
             "device": "cuda" if cfg.device.startswith("cuda") else "cpu", "runtime": cfg.runtime,
             "metrics": sorted(metrics_to_measure(ctx))}
    if cfg.dataset_sha256:
        # own data: the path says nothing of the content, and the train share moves calibration (built-in tasks'
        # keys are unchanged, so their caches stay valid)
        parts["dataset_file"] = {"sha256": cfg.dataset_sha256, "train_share": cfg.train_share}
    if cfg.calib_data_sha256:
        # recipes calibrated on a --calib-data file are not those calibrated on the task's train split (and a run
        # without the file keeps its key, so existing caches stay valid)
        parts["calibration"]["text_sha256"] = cfg.calib_data_sha256
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20], parts


def _final_key(ctx: RunContext) -> str:
    cfg = ctx.cfg
    return f"{cfg.final_limit}:{','.join(sorted(final_metric_names(ctx)))}"


def final_metric_names(ctx: RunContext) -> list[str]:
    """The held-out report's metrics (the final evaluation's, for candidates and recipes alike). Latency is reported
    there, labelled with its runtime, where it is cheap to measure (a GPU, or llama.cpp); on a CPU transformers runs
    compressed-tensors through its fake-quantized path at minutes per model, a figure no deployment would see, so it
    is not measured there unless it is an objective (SPEC.md, "Objectives")."""
    extra = ["latency"] if ctx.cfg.device.startswith("cuda") or ctx.cfg.runtime == "llamacpp" else []
    return list(dict.fromkeys((ctx.cfg.final_metrics or list(ctx.task.metrics)) + list(names(held_out=True))
                              + extra))


class RecipeCache:
    """`$ACF_CACHE/recipes/<key>/`: `<name>.json` records and `<name>/` model folders."""

    def __init__(self, folder: Path, parts: Optional[dict[str, Any]] = None):
        self.dir = Path(folder)
        self.parts = parts

    def record(self, name: str) -> Optional[dict]:
        p = self.dir / f"{name}.json"
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
            Candidate.model_validate(rec["candidate"])
            return rec
        except (ValueError, KeyError, TypeError):
            return None   # a damaged record is measured again and overwritten, never trusted

    def write(self, name: str, cand: Candidate, finals: Optional[dict] = None) -> None:
        old = self.record(name) or {}
        rec = {"key_parts": self.parts if self.parts is not None else old.get("key_parts"), "candidate": json.loads(cand.model_dump_json()),
               "finals": {**old.get("finals", {}), **(finals or {})}}
        write_text(self.dir / f"{name}.json", json.dumps(rec, indent=1) + "\n")

    def model_dir(self, name: str) -> Path:
        return self.dir / name


def cache_for(ctx: RunContext, model_path: str) -> RecipeCache:
    from acf.models.loading import cache_dir

    key, parts = cache_key(ctx, model_path)
    return RecipeCache(cache_dir() / "recipes" / key, parts)


def ensure_recipes(ctx: RunContext, model_path: str, refresh: Optional[Callable[[], Any]] = None) -> None:
    """Measure (or take from the cache) every recipe of the run not yet in its store; then keep the models of the
    recipe frontier only. A recipe that fails is recorded with its reason; the run goes on. `refresh` re-derives
    `ctx.ff` after each write (default: the single process's `run_store.save_run`, which also writes frontier.json;
    a worker passes its own)."""
    refresh = refresh or (lambda: save_run(ctx))
    assert ctx.ff is not None and ctx.ff.baseline is not None
    strategies = recipe_strategies(ctx)
    have = {c.id for c in ctx.ff.recipes}
    missing = {n: s for n, s in strategies.items() if recipe_id(n) not in have}
    if not missing:
        return
    cache = cache_for(ctx, model_path)
    ctx.say(f"[bold]yardstick[/]: {len(strategies)} fixed recipes ({', '.join(strategies)}); "
            f"{len(missing)} to measure or read from the cache {cache.dir}")
    for i, (name, strategy) in enumerate(missing.items(), 1):
        rec = cache.record(name)
        if rec is not None:
            cand = Candidate.model_validate(rec["candidate"])
            cand.artifact = str(cache.model_dir(name)) if cache.model_dir(name).is_dir() else None
            ctx.say(f"  [dim]recipe {i}/{len(missing)} {name}: from the cache[/]")
            put_recipe(ctx.study, cand)
            fin = rec.get("finals", {}).get(_final_key(ctx))
            if fin is not None:
                metrics = {k: Measurement.model_validate(m) for k, m in fin["metrics"].items()}
                put_final(ctx.study, cand.id, metrics, fin["seconds"])
        else:
            ctx.say(f"  [bold]recipe {i}/{len(missing)}[/] {name}: {strategy.describe()}")
            cand = measure_recipe(ctx, name, strategy, model_path, cache)
            if cand.status == "ok":   # a failure (out of memory, a library error) is tried again by a later run
                cache.write(name, cand)
            put_recipe(ctx.study, cand)
        refresh()
    keep_frontier_models(ctx, cache)


def measure_recipe(ctx: RunContext, name: str, strategy: Strategy, model_path: str, cache: RecipeCache) -> Candidate:
    """Compress with the recipe into the cache and evaluate it as a candidate is evaluated (same items, metrics and
    reference)."""
    t0 = time.time()
    out = cache.model_dir(name)
    records, err = compress(ctx, recipe_id(name), strategy, model_path, 0, out=out,
                            log_dir=ctx.dir / "recipes" / name / "logs")
    cand = Candidate(id=recipe_id(name), episode=0, strategy=strategy, description=f"fixed recipe {name}: "
                     f"{strategy.describe()}", proposed_by="fixed recipe", steps=records, started_at=now())
    if err:
        cand.status, cand.reason = "failed", err[:500]
        ctx.say(f"  [red]recipe {name} failed[/]: {cand.reason}")
    else:
        try:
            res = evaluate_in_run(ctx, out, metrics_to_measure(ctx), ctx.cfg.limit)
        except (KeyboardInterrupt, AcfError):
            raise
        except Exception as e:  # noqa: BLE001 - one recipe's evaluation failing leaves it out of the yardstick
            cand.status, cand.reason = "failed", f"evaluation: {type(e).__name__}: {str(e)[:300]}"
        else:
            cand.metrics = res.metrics
            cand.objectives = objective_values(ctx.cfg.objectives, res.metrics)
            ctx.say(metrics_line(name, res.metrics, ctx.cfg.objectives))
    cand.timings = {"recipe": round(time.time() - t0, 2)}
    cand.finished_at = now()
    cand.artifact = str(out) if cand.status == "ok" and out.is_dir() else None
    if cand.artifact is None:
        shutil.rmtree(out, ignore_errors=True)
    return cand


def keep_frontier_models(ctx: RunContext, cache: RecipeCache) -> None:
    """Delete the cached models of recipes off the recipe frontier (their measurements stay): the report measures
    only the frontier's held out. With --keep-all every model stays."""
    if ctx.cfg.keep_all or ctx.ff is None:
        return
    keep = {c.id for c in ctx.ff.recipe_frontier()}
    for c in ctx.ff.recipes:
        if c.id not in keep and c.artifact and Path(c.artifact).is_dir() and Path(c.artifact).parent == cache.dir:
            shutil.rmtree(c.artifact, ignore_errors=True)


def remember_final(ctx: RunContext, cid: str, metrics: dict[str, Measurement], seconds: float) -> None:
    """A recipe's held-out measurement also goes into the cache, so a later run with the same report settings
    reads it instead of measuring it again."""
    assert ctx.ff is not None
    cand = next((c for c in ctx.ff.recipes if c.id == cid), None)
    if cand is None or not cand.artifact:
        return
    cache, name = RecipeCache(Path(cand.artifact).parent), Path(cand.artifact).name
    rec = cache.record(name)
    if rec is None:
        return
    cache.write(name, Candidate.model_validate(rec["candidate"]),
                {_final_key(ctx): {"metrics": {k: json.loads(m.model_dump_json()) for k, m in metrics.items()},
                                   "seconds": round(seconds, 2)}})
