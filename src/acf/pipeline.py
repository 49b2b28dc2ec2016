"""What each episode step does: the logic behind the coordinator graph's nodes.

The graph (`acf.graph`) only routes between these functions. Each function reads and writes the run
directory through `RunContext`, so a process killed at any point resumes from disk (frontier.json, the
Optuna study) plus the LangGraph checkpoint, losing at most the episode in flight.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import optuna

from . import __version__
from .atomic import clean_partial_dirs, write_json, write_text
from .errors import AcfError, MethodFailed, StrategyError
from .objectives import DIRECTIONS, QUALITY
from .pareto import hypervolume, pareto_front, reference_point
from .provenance import Measurement, device_string, git_commit, runtime_string
from .reward import recommend, retention, reward
from .search import trial_for
from .state import Candidate, FrontierFile, HVPoint, Recommendation, RunMeta, episodes_recorded, now
from .strategy import Strategy, validate_strategy

if TYPE_CHECKING:
    from .evaluation.runner import Loaded
    from .sanity import SanityReport

log = logging.getLogger(__name__)

from .preflight import estimate_cost, free_memory, memory_estimates, preflight  # noqa: F401 (episode, tools)
from .run_context import (CHEAP_METRICS, DEFAULT_MAX_KLD, DEFAULT_OBJECTIVES, FIDELITY_MEASURED,  # noqa: F401
                          RUNTIME_METRICS, RUNTIMES, RunConfig, RunContext, validate_config)


# ---- nodes' logic ----------------------------------------------------------------------------------------

def init_run(ctx: RunContext) -> dict:
    """Resolve the model, infer its spec, create frontier.json and the study; seed known-good recipes."""
    from .models import resolve_model
    from .spec import infer_spec, save_spec

    cfg = ctx.cfg
    ctx.dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    save_spec(spec, ctx.dir / "model_spec.json")
    ctx._spec = spec
    if ctx.ff is None:
        meta = RunMeta(run_id=ctx.dir.name, model=cfg.model, model_path=str(model_path), dataset=cfg.dataset,
                       objectives=cfg.objectives, directions={o: DIRECTIONS[o] for o in cfg.objectives},
                       preset=cfg.preset, min_retention=cfg.min_retention, sampler=cfg.sampler, seed=cfg.seed,
                       limit=cfg.limit, proxy_limit=cfg.proxy_limit, episodes=cfg.episodes, device=cfg.device,
                       device_name=device_string(cfg.device), acf_version=__version__, git_commit=git_commit(),
                       runtime=runtime_string(), created_at=now(), updated_at=now(), command=cfg.command,
                       study_name=cfg.study(), storage=redact(cfg.storage_url()), max_kld=cfg.max_kld,
                       item_sets=item_sets(cfg))
        from .spec import spec_summary

        ctx.ff = FrontierFile(run=meta, spec=spec_summary(spec))
        ctx.save()
    study = ctx.study
    if not study.trials:
        for p in ctx.space.seeds() if cfg.sampler != "grid" else ctx.space.grid():
            study.enqueue_trial(p, skip_if_exists=True)
    ctx.say(f"[bold]model[/] {cfg.model} ({spec.params / 1e6:.1f}M params, {spec.num_layers} layers, valid group "
            f"sizes {spec.valid_group_sizes}) · [bold]task[/] {cfg.dataset} · [bold]objectives[/] "
            f"{', '.join(cfg.objectives)} · [bold]device[/] {device_string(cfg.device)}")
    return {"model_path": str(model_path)}


def item_sets(cfg: RunConfig) -> dict[str, Any]:
    """What frontier.json says about which items rank candidates and which the report uses (disjoint)."""
    lim = cfg.limit
    return {"split": "test", "permutation_seed": cfg.seed,
            "search": {"offset": 0, "count": lim, "proxy_count": cfg.proxy_limit,
                       "use": "ranks candidates (proxy = its first proxy_count items)"},
            "report": {"offset": lim or 0, "count": cfg.final_limit,
                       "use": "final evaluation of frontier members (--final-limit), never seen by the search"},
            "calibration_and_training": "train split, in the prompt format evaluation uses"}


def redact(url: str) -> str:
    """Storage URLs may carry a password; it never reaches frontier.json or logs."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def metrics_to_measure(ctx: RunContext) -> list[str]:
    want = list(ctx.cfg.objectives) + list(CHEAP_METRICS) + list(FIDELITY_MEASURED)
    if "answer_nll" in ctx.task.metrics:
        want.append("answer_nll")
    if "latency" in want or "memory" in want:
        want += ["ttft", "throughput"]
    return list(dict.fromkeys(want))


def _evaluate(ctx: RunContext, model_dir: Path, metrics: list[str], limit: Optional[int], *, loaded=None,
              part: str = "search", known_sparsity: Optional[Measurement] = None):
    from .evaluation import evaluate

    offset, _ = ctx.item_range(part)
    fid = ctx.fidelity(part) if any(m in FIDELITY_MEASURED for m in metrics) else None
    return evaluate(model_dir, ctx.task, metrics, limit=limit, seed=ctx.cfg.seed, device=ctx.cfg.device,
                    batch_size=ctx.cfg.eval_batch_size, accuracy_limit=ctx.cfg.accuracy_limit,
                    latency_tokens=ctx.cfg.latency_tokens, show_progress=ctx.console.is_terminal,
                    trust_remote_code=ctx.cfg.trust_remote_code, loaded=loaded, item_offset=offset, fidelity=fid,
                    known_sparsity=known_sparsity)


def evaluate_baseline(ctx: RunContext, model_path: str) -> None:
    """The uncompressed model with the same evaluator and items; its reference distributions are computed from
    the same load and cached for every candidate."""
    from .evaluation.runner import Loaded

    assert ctx.ff is not None
    if ctx.ff.baseline is not None:
        return
    recorded = recorded_sanity(ctx)
    if recorded is not None:
        judge_sanity(ctx, recorded)     # a resumed run: the check is not measured again
    t0 = time.time()
    loaded = Loaded.load(model_path, ctx.cfg.device, ctx.cfg.trust_remote_code)
    try:
        if recorded is None and not ctx.cfg.skip_sanity:
            judge_sanity(ctx, measure_sanity(ctx, loaded))
        elif recorded is None:
            ctx.say("[yellow]baseline sanity check skipped[/] (--skip-sanity)")
        ctx.say("[bold]baseline[/]: evaluating the uncompressed model with the same evaluator")
        ctx.fidelity("search", loaded=loaded)
        res = _evaluate(ctx, Path(model_path), metrics_to_measure(ctx), ctx.cfg.limit, loaded=loaded)
        proxy = {}
        if ctx.cfg.proxy_limit:
            q = [m for m in ctx.cfg.objectives if m in QUALITY]
            if q:
                proxy = _evaluate(ctx, Path(model_path), q, ctx.cfg.proxy_limit, loaded=loaded).metrics
    finally:
        loaded.free()
    if ctx.cfg.runtime == "llamacpp":
        _baseline_costs_in_llamacpp(ctx, Path(model_path), res.metrics)
    cand = Candidate(id="baseline", episode=0, strategy=Strategy(), description="baseline (no compression)",
                     proposed_by="baseline", metrics=res.metrics, proxy_metrics=proxy,
                     objectives=_objective_values(ctx, res.metrics), retention=1.0, artifact=model_path,
                     artifact_kept=True, timings={"evaluate": round(time.time() - t0, 2)}, started_at=now(),
                     finished_at=now())
    ctx.ff.baseline = cand
    write_json(ctx.dir / "baseline_predictions.json", res.predictions)
    refresh_frontier(ctx)
    ctx.save()
    ctx.say(metrics_line("baseline", res.metrics, ctx.cfg.objectives))


def recorded_sanity(ctx: RunContext) -> Optional["SanityReport"]:
    """The sanity check this run recorded (RUN_DIR/sanity.json), or None. An unreadable record is named and
    measured again, never taken as a pass."""
    from .sanity import SANITY_FILE, load_report

    try:
        return load_report(ctx.dir / SANITY_FILE)
    except AcfError as e:
        ctx.say(f"[yellow]{e}[/]: measuring the sanity check again")
        return None


def measure_sanity(ctx: RunContext, loaded: "Loaded") -> "SanityReport":
    """Check the baseline before the search spends anything (acf.sanity): a few search items' text, a greedy
    continuation, the tokenizer's granularity; recorded atomically in RUN_DIR/sanity.json."""
    from .evaluation.runner import eval_items
    from .sanity import SANITY_FILE, SANITY_ITEMS, check_baseline, save_report

    cfg = ctx.cfg
    items = eval_items(ctx.task, min(SANITY_ITEMS, cfg.limit or SANITY_ITEMS), cfg.seed)
    ctx.say("[bold]sanity check[/] of the baseline: NLL on the task's text, a greedy continuation, characters per "
            "token")
    rep = check_baseline(loaded.model, loaded.tokenizer, ctx.task, items, cfg.device, batch_size=cfg.eval_batch_size,
                         model_name=cfg.model)
    save_report(rep, ctx.dir / SANITY_FILE)
    return rep


def judge_sanity(ctx: RunContext, rep: "SanityReport") -> None:
    """Stop the run (SanityFailed, exit 2) when the check found problems, unless --skip-sanity overrides them."""
    from .sanity import SANITY_FILE, SanityFailed, failure_message, summary

    ctx.say(f"  {summary(rep)}")
    if rep.ok:
        return
    if ctx.cfg.skip_sanity:
        ctx.say(f"  [yellow]going on despite it (--skip-sanity)[/]: {'; '.join(rep.problems)}")
        return
    raise SanityFailed(failure_message(rep, f"acf run --resume {ctx.dir} --skip-sanity (values in "
                                            f"{ctx.dir / SANITY_FILE})"))


def _baseline_costs_in_llamacpp(ctx: RunContext, model_path: Path, metrics: dict[str, Measurement]) -> None:
    """--runtime llamacpp: the baseline's latency/ttft/throughput/memory (and size) measured in llama.cpp on its F16
    GGUF (llama.cpp's converter, no quantization), so the latency objective compares one runtime. Its quality
    metrics stay those of the HF model, which is what kld's reference is. A baseline that cannot be exported fails
    the run: comparing llama.cpp candidates with a transformers baseline would be the mixed comparison this avoids."""
    from .methods import StepContext, run_strategy
    from .strategy import validate_strategy

    out = ctx.dir / "baseline-gguf-f16"
    if not (out / "model.gguf").is_file():
        strat = validate_strategy({"steps": [{"method": "gguf", "params": {"type": "F16", "imatrix": False}}]})
        recs = run_strategy(strat, model_path, out, StepContext(device="cpu", task=ctx.task, seed=ctx.cfg.seed),
                            log_dir=ctx.dir / "baseline-gguf-f16.logs")
        if not recs or recs[-1].status != "ok":
            raise AcfError(f"--runtime llamacpp: the baseline could not be exported to GGUF F16 "
                           f"({recs[-1].reason if recs else 'no step ran'})")
    want = [m for m in metrics_to_measure(ctx) if m in RUNTIME_METRICS or m == "size"]
    res = _evaluate(ctx, out, want, ctx.cfg.limit)
    for k, m in res.metrics.items():
        m.extra["measured_on"] = "the baseline's F16 GGUF in llama.cpp (--runtime llamacpp)"
        if k == "size":
            m.extra["hf_checkpoint_bytes"] = metrics["size"].value if "size" in metrics else None
        metrics[k] = m


def _objective_values(ctx: RunContext, metrics: dict[str, Measurement]) -> dict[str, float]:
    return objective_values(ctx.cfg.objectives, metrics)


def objective_values(objectives: list[str], metrics: dict[str, Measurement]) -> dict[str, float]:
    return {o: metrics[o].value for o in objectives if o in metrics and metrics[o].value is not None}


def metrics_line(label: str, metrics: dict[str, Measurement], objectives: list[str]) -> str:
    parts = []
    for o in list(dict.fromkeys(objectives + ["kld", "top1", "answer_nll", "accuracy", "size"])):
        m = metrics.get(o)
        if m is None or m.value is None:
            continue
        parts.append(f"{o}={_fmt(o, m.value)}")
    return f"  [dim]{label}:[/] " + " · ".join(parts)


def _fmt(name: str, v: float) -> str:
    if name in ("size", "memory"):
        return f"{v / 2**20:.1f} MiB"
    if name in ("latency", "ttft"):
        return f"{v:.1f} ms"
    if name in ("kld", "kld_general"):
        return f"{v:.4f}"
    if name in ("accuracy", "sparsity", "mc1", "mc2", "accuracy_norm", "pass@1", "top1"):
        return f"{v:.3f}"
    if name == "params":
        return f"{v / 1e6:.1f}M"
    return f"{v:.4f}"


def episodes_done(ctx: RunContext) -> int:
    return episodes_recorded(ctx.ff)


def stop_reason(ctx: RunContext) -> Optional[str]:
    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None
    if episodes_done(ctx) >= cfg.episodes:
        return f"episodes: {cfg.episodes} done"
    if cfg.budget_minutes is not None and ff.run.wall_seconds + (time.time() - ctx.t_start) >= cfg.budget_minutes * 60:
        return f"time budget of {cfg.budget_minutes:g} min used"
    if cfg.patience is not None and len(ff.hypervolume) > cfg.patience:
        last = [h.hypervolume for h in ff.hypervolume[-(cfg.patience + 1):]]
        if max(last) - last[0] <= 1e-12:
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
    study = ctx.study
    for _ in range(50):
        trial = study.ask()
        strategy = ctx.space.suggest(trial)
        try:
            strategy = validate_strategy(strategy, ctx.spec, ctx.cfg.device)
        except StrategyError as e:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return {**started, "episode": episode, "trial": trial.number, "strategy": strategy.model_dump(),
                    "proposed_by": _proposer(ctx, trial), "rejected": str(e), "t_propose": round(time.time() - t0, 3)}
        prev = evaluated_twin(ctx, strategy)
        if prev is None:
            return {**started, "episode": episode, "trial": trial.number, "strategy": strategy.model_dump(),
                    "proposed_by": _proposer(ctx, trial), "t_propose": round(time.time() - t0, 3)}
        tell_like(ctx, trial, prev)
    raise AcfError("the search space is exhausted: 50 proposals in a row repeated evaluated strategies")


def evaluated_twin(ctx: RunContext, strategy: Strategy) -> Optional[Candidate]:
    """The latest candidate evaluated (ok, pruned or failed) with this strategy: a repeat proposal is told its
    result (the sampler learns, no compute is spent) instead of running again."""
    assert ctx.ff is not None
    key = strategy.key()
    return next((c for c in reversed(ctx.ff.candidates)
                 if c.status in ("ok", "pruned", "failed") and c.strategy.key() == key), None)


def _proposer(ctx: RunContext, trial: optuna.Trial) -> str:
    # Optuna 5's Trial has no system_attrs; the stored trial does (enqueued trials carry fixed_params).
    fixed = ctx.study.get_trials(deepcopy=False)[trial.number].system_attrs.get("fixed_params")
    if fixed:
        return "seed recipe" if ctx.cfg.sampler != "grid" else "preset grid"
    return f"optuna:{ctx.cfg.sampler}"


def tell_like(ctx: RunContext, trial: optuna.Trial, prev: Candidate) -> None:
    if prev.status == "ok" and len(prev.objectives) == len(ctx.cfg.objectives):
        set_constraint(ctx, trial, prev)
        ctx.study.tell(trial, [prev.objectives[o] for o in ctx.cfg.objectives])
    elif prev.status == "pruned":
        ctx.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        ctx.study.tell(trial, state=optuna.trial.TrialState.FAIL)


def set_constraint(ctx: RunContext, trial: optuna.Trial, cand: Candidate) -> None:
    """Optuna constraints (feasible when <= 0): task-quality retention and kld, each set on every told trial."""
    if ctx.cfg.min_retention is not None:
        ret = cand.retention
        trial.set_constraint("retention", ctx.cfg.min_retention - ret if ret is not None else 0.0)
    if ctx.cfg.max_kld is not None:
        k = _kld(cand)
        trial.set_constraint("kld", k - ctx.cfg.max_kld if k is not None else 0.0)


def _kld(cand: Candidate) -> Optional[float]:
    m = cand.metrics.get("kld")
    return None if m is None else m.value


def compress(ctx: RunContext, cid: str, strategy: Strategy, model_path: str, episode: int,
             log_dir: Optional[Path] = None) -> tuple[list, Optional[str]]:
    """Run the strategy's steps into artifacts/<cid>. Returns (step records, failure reason or None)."""
    from .methods import StepContext
    from .methods.runner import run_strategy

    out = ctx.artifact_dir(cid)
    clean_partial_dirs(out.parent)
    if out.exists():
        shutil.rmtree(out)  # an earlier attempt of this episode died half-way: redo it
    sctx = StepContext(device=ctx.cfg.device, task=ctx.task, teacher_dir=Path(model_path), seed=ctx.cfg.seed,
                       trust_remote_code=ctx.cfg.trust_remote_code)
    try:
        records = run_strategy(strategy, Path(model_path), out, sctx,
                               log_dir=log_dir or ctx.episode_dir(episode) / "logs")
    except MethodFailed as e:
        return getattr(e, "records", []), str(e)
    failed = [r for r in records if r.status != "ok"]
    if failed:
        return records, failed[0].reason or "a step failed"
    return records, None


def sparsity_from_steps(strategy: Strategy, steps: list) -> Optional[Measurement]:
    """For a quantized result: the sparsity its pruning steps measured before quantization (0 without one)."""
    from .strategy import kind_of

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
    res = _evaluate(ctx, art, q + ["size"], cfg.proxy_limit, loaded=ctx.loaded(cid, art))
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
    from .pareto import dominates

    for c in _ok_candidates(ctx):
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
    from .strategy import kind_of

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
            res = _evaluate(ctx, art, [m for m in metrics_to_measure(ctx) if m not in ("latency", "ttft",
                                                                                     "throughput", "memory")],
                            ctx.cfg.limit)
            cand.metrics = res.metrics
            cand.objectives = _objective_values(ctx, res.metrics)
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
    ff.controls.append(cand)
    ctx.save()
    ctx.say(metrics_line(cid, cand.metrics, ctx.cfg.objectives) if cand.status == "ok"
            else f"  [red]control {cid} failed[/]: {cand.reason}")
    return cid


def final_evaluation(ctx: RunContext) -> None:
    """Measure the baseline, every frontier member and their controls on --final-limit held-out items.

    These items come after the search items in the test split's permutation: the search never saw them, so the
    numbers a user quotes are not selected on the items they are measured on. Already-done members are skipped,
    so a resumed run does not redo them.
    """
    cfg, ff = ctx.cfg, ctx.ff
    assert ff is not None
    if not cfg.final_limit:
        return
    metrics = list(dict.fromkeys((cfg.final_metrics or list(ctx.task.metrics)) + ["kld", "top1", "kld_general"]))
    offset, _ = ctx.item_range("report")
    from .evaluation.runner import eval_items

    n = len(eval_items(ctx.task, cfg.final_limit, cfg.seed, offset))
    if n == 0:
        ctx.say(f"[yellow]final evaluation skipped[/]: the test split has no items left after the {cfg.limit} "
                f"search items (lower --limit to hold some out)")
        return
    ids = ["baseline"] + [c for c in ff.frontier if c != "baseline"]
    ids += [c.control for c in (ff.candidate(i) for i in ids) if c.control]
    for cid in dict.fromkeys(ids):
        c = ff.candidate(cid)
        if c.final_metrics or not c.artifact or not Path(c.artifact).exists():
            continue
        ctx.say(f"[bold]final evaluation[/] of {cid} on {n} held-out items (test items {offset}..{offset + n - 1} "
                f"of the permutation): {', '.join(metrics)}")
        t0 = time.time()
        res = _evaluate(ctx, Path(c.artifact), metrics, cfg.final_limit, part="report",
                        known_sparsity=sparsity_from_steps(c.strategy, c.steps))
        c.final_metrics = res.metrics
        c.timings["final_evaluate"] = round(time.time() - t0, 2)
        ctx.say(metrics_line(cid, res.metrics, metrics))
        ctx.save()


def full_evaluation(ctx: RunContext, cid: str, known_sparsity: Optional[Measurement] = None):
    art = ctx.artifact_dir(cid)
    return _evaluate(ctx, art, metrics_to_measure(ctx), ctx.cfg.limit, loaded=ctx.loaded(cid, art),
                     known_sparsity=known_sparsity)


def _ok_candidates(ctx: RunContext) -> list[Candidate]:
    assert ctx.ff is not None
    out = [c for c in ctx.ff.candidates if c.status == "ok"]
    if ctx.ff.baseline is not None:
        out = [ctx.ff.baseline] + out
    return out


def record(ctx: RunContext, cand: Candidate, trial_number: Optional[int], predictions: Optional[list] = None) -> None:
    """Record an episode's outcome: frontier.json, episode folder, Optuna tell, artifacts of non-frontier members.

    Idempotent: a candidate already recorded (the process died after writing but before the checkpoint) is not
    recorded twice, and a trial already told is not told again.
    """
    ff = ctx.ff
    assert ff is not None and ff.baseline is not None
    if any(c.id == cand.id for c in ff.candidates):
        return
    score(ctx.cfg, ff.baseline.objectives, cand)
    cand.finished_at = now()
    ff.candidates.append(cand)
    refresh_frontier(ctx)
    # Optuna
    if trial_number is not None:
        _tell(ctx, trial_number, cand)
    # artifacts: keep frontier members (and all with --keep-all)
    if not ctx.cfg.keep_all:
        for c in ff.candidates:
            if c.artifact and c.artifact_kept and c.id not in ff.frontier:
                shutil.rmtree(c.artifact, ignore_errors=True)
                c.artifact_kept = False
    ctx.save()
    ed = ctx.episode_dir(cand.episode)
    write_json(ed / "strategy.json", cand.strategy.model_dump())
    write_text(ed / "result.json", cand.model_dump_json(indent=2))
    if predictions:
        write_json(ed / "predictions.json", predictions)


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
                             _kld(cand)).reward
    else:
        cand.status, cand.reason = "failed", "evaluation produced no value for " + ", ".join(
            o for o in cfg.objectives if o not in cand.objectives)


def _tell(ctx: RunContext, number: int, cand: Candidate) -> None:
    study = ctx.study
    t = study.get_trials(deepcopy=False)[number]
    if t.state != optuna.trial.TrialState.RUNNING:
        return
    trial = trial_for(study, number)
    trial.set_user_attr("candidate", cand.id)
    if cand.reason:
        trial.set_user_attr("reason", cand.reason[:500])
    if cand.status == "ok":
        set_constraint(ctx, trial, cand)
        study.tell(trial, [cand.objectives[o] for o in ctx.cfg.objectives])
    elif cand.status == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def refresh_frontier(ctx: RunContext) -> None:
    """Recompute frontier ids, hypervolume history and the recommended pick from the recorded candidates."""
    ff = ctx.ff
    assert ff is not None and ff.baseline is not None
    objs = ctx.cfg.objectives
    points = {c.id: c.objectives for c in _ok_candidates(ctx) if len(c.objectives) == len(objs)}
    ff.frontier = pareto_front(points, objs)
    base = ff.baseline.objectives
    if len(base) == len(objs):
        ref = reference_point(base, objs, fixed={"kld": ctx.cfg.max_kld} if ctx.cfg.max_kld else None)
        ff.reference_point = ref
        hv = hypervolume([points[k] for k in ff.frontier], objs, ref, normalise=base)
        ep = episodes_done(ctx)
        ff.hypervolume = [h for h in ff.hypervolume if h.episode != ep] + [HVPoint(episode=ep, hypervolume=hv)]
        klds = {c.id: _kld(c) for c in _ok_candidates(ctx)}
        rec = recommend(points, [k for k in ff.frontier], base, objs, ctx.cfg.preset, ctx.cfg.min_retention,
                        ctx.cfg.max_kld, klds)
        if rec is not None:
            cid, r = rec
            ff.recommended = Recommendation(id=cid, reward=r.reward, terms=r.terms, preset=ctx.cfg.preset,
                                            why=_why(cid, r, ctx.cfg.min_retention))
    for c in ff.candidates:
        if c.status == "ok" and len(c.objectives) == len(objs):
            c.reward = reward(c.objectives, base, objs, ctx.cfg.preset, ctx.cfg.min_retention, ctx.cfg.max_kld,
                              _kld(c)).reward


def _why(cid: str, r, min_ret: Optional[float]) -> str:
    parts = [f"{k}: {v:+.3f}" for k, v in sorted(r.terms.items(), key=lambda kv: -abs(kv[1]))]
    s = f"highest {('feasible ' if r.feasible else '')}reward on the frontier ({r.reward:.3f} = " + ", ".join(parts)
    if r.penalty:
        s += f", minus penalty {r.penalty:.3f} for retention {r.retention:.3f} < {min_ret}"
    return s + ")"


def frontier_table(ctx: RunContext):
    from rich.table import Table

    ff = ctx.ff
    assert ff is not None
    t = Table(title=f"Frontier after {episodes_done(ctx)} episodes ({len(ff.frontier)} members)")
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
                  *[_fmt(o, c.metrics[o].value) if o in c.metrics and c.metrics[o].value is not None else "-"
                    for o in cols],
                  f"{c.retention:.3f}" if c.retention is not None else "-",
                  f"{c.reward:.3f}" if c.reward is not None else "-")
    return t


def release_trial(ctx: RunContext, number: int, reason: str) -> None:
    """Close a trial that will not be evaluated as proposed (user edit or stop), so it never stays RUNNING."""
    study = ctx.study
    t = study.get_trials(deepcopy=False)[number]
    if t.state == optuna.trial.TrialState.RUNNING:
        trial_for(study, number).set_user_attr("reason", reason)
        study.tell(number, state=optuna.trial.TrialState.FAIL)
