"""The Optuna study as a run's one store of results, for single-process and distributed runs alike.

Everything a run measures is written into its study (SQLite `RUN_DIR/study.db` by default, or the shared storage):
the configuration, model spec and run metadata, the baseline, the control rows, one candidate record per episode,
the held-out final metrics, the run's wall time and why it stopped. `frontier.json` is derived from the study alone
(`frontier_from_study`, written atomically by `publish`), after every write, by whichever process wrote. So a
killed run, a resumed run, a worker and `acf rebuild` all see the same results through the same function, and
nothing has to be reconciled between files: a lost or damaged frontier.json is rebuilt, never trusted over the
study. The LangGraph checkpoint (`checkpoints.db`) only says where the graph stood (the episode in flight).

A candidate record lives on its Optuna trial (`T_RECORD`) while that trial runs, and is told with it; a candidate
without a running trial (a user's edit of a proposal, a proposal refused by validation after its trial was closed)
is a study attribute (`A_RECORD` + id). These names are the stored format: change them only with a migration.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState

from acf.core.errors import AcfError, RunDirError
from acf.core.provenance import Measurement
from acf.coordinator.records import refresh_frontier, score
from acf.coordinator.run_context import RunConfig, RunContext
from acf.coordinator.state import (Candidate, FrontierFile, RunMeta, Screened, load_frontier_file,
                                   save_frontier_file)

# study user attributes (the run)
A_CONFIG = "acf_config"            # RunConfig the results were scored with (storage URL left out)
A_RUN_META = "acf_run_meta"        # RunMeta of frontier.json
A_SPEC = "acf_spec"                # model spec summary
A_STARTED = "acf_started_at"       # epoch seconds: a shared run's time budget counts from here
A_BASELINE = "acf_baseline"        # baseline Candidate record
A_STOPPED = "acf_stopped_because"
A_WALL = "acf_wall_seconds"        # single process: wall time summed over its processes (time between them excluded)
A_CONTROL = "acf_control:"         # + control id: a control row (baseline + the same recovery, no compression)
A_RECIPE = "acf_recipe:"           # + recipe id: a fixed recipe of the yardstick (acf.search.recipes)
A_RECORD = "acf_record:"           # + candidate id: a candidate with no running trial of its own
A_FINAL = "acf_final:"             # + candidate id: {"metrics", "seconds"} on the held-out report items
# trial user attributes
T_RECORD = "acf_record"            # the Candidate record (JSON) of the trial's episode
T_SCREENED = "acf_screened"        # a proposal screened out by its prediction (state.Screened); trial PRUNED
T_CLOSED = "reason"                # why a single process closed a trial without an episode (a user's edit or stop)
# trial user attributes of a shared study (acf.distributed), written through acf.coordinator.trial
T_PROPOSAL = "acf_proposal"        # {strategy, proposed_by, describe, estimate} shown at approval
T_STRATEGY = "acf_strategy"        # an edited strategy that replaces the sampled one
T_RELEASED = "acf_released"        # why a trial was closed without an episode (budget, duplicate, approval moves)
T_DUPLICATE = "acf_duplicate_of"   # the candidate whose result a repeated strategy was told
T_STRATEGY_KEY = "acf_strategy_key"  # the strategy a worker runs: another worker does not run it twice


def _json(model: Any) -> Any:
    return json.loads(model.model_dump_json())


# ---- writing ---------------------------------------------------------------------------------------------------

def has_run(study: optuna.Study) -> bool:
    attrs = study.user_attrs
    return A_CONFIG in attrs and A_RUN_META in attrs


def put_run(study: optuna.Study, cfg: RunConfig, meta: RunMeta, spec: dict[str, Any]) -> None:
    """The run's identity, once: config, metadata and spec summary (an existing run keeps its own)."""
    if has_run(study):
        return
    put_config(study, cfg)
    study.set_user_attr(A_SPEC, json.loads(json.dumps(spec)))
    study.set_user_attr(A_STARTED, time.time())
    study.set_user_attr(A_RUN_META, _json(meta))


def put_config(study: optuna.Study, cfg: RunConfig) -> None:
    """The configuration results are scored with (a resume may extend --episodes); never the storage URL, which
    may carry a password."""
    shared = cfg.model_copy(update={"storage": None, "interactive": False, "planner": None})
    study.set_user_attr(A_CONFIG, _json(shared))


def put_baseline(study: optuna.Study, cand: Candidate) -> None:
    study.set_user_attr(A_BASELINE, _json(cand))


def put_control(study: optuna.Study, cand: Candidate) -> None:
    study.set_user_attr(A_CONTROL + cand.id, _json(cand))


def put_recipe(study: optuna.Study, cand: Candidate) -> None:
    study.set_user_attr(A_RECIPE + cand.id, _json(cand))


def put_final(study: optuna.Study, cid: str, metrics: dict[str, Measurement], seconds: float) -> None:
    study.set_user_attr(A_FINAL + cid, {"metrics": {k: _json(m) for k, m in metrics.items()},
                                        "seconds": round(seconds, 2)})


def put_stopped(study: optuna.Study, reason: Optional[str]) -> None:
    study.set_user_attr(A_STOPPED, reason)


def add_wall(study: optuna.Study, seconds: float) -> None:
    study.set_user_attr(A_WALL, round(float(study.user_attrs.get(A_WALL, 0.0)) + max(0.0, seconds), 1))


def put_trial_record(trial: optuna.Trial, cand: Candidate) -> None:
    """The candidate record onto its trial (told by the caller: acf.coordinator.trial.record)."""
    trial.set_user_attr(T_RECORD, _json(cand))
    trial.set_user_attr("candidate", cand.id)
    if cand.reason:
        trial.set_user_attr("reason", cand.reason)


def put_loose_record(study: optuna.Study, cand: Candidate) -> bool:
    """A candidate with no running trial of its own, as a study attribute; False when it is there already."""
    if A_RECORD + cand.id in study.user_attrs:
        return False
    study.set_user_attr(A_RECORD + cand.id, _json(cand))
    return True


def baseline_objectives(study: optuna.Study) -> Optional[dict[str, float]]:
    """The stored baseline's objective values (what candidates are scored against), None before it is measured."""
    base = study.user_attrs.get(A_BASELINE)
    return None if base is None else Candidate.model_validate(base).objectives


def adopt_frontier_file(study: optuna.Study, cfg: RunConfig, ff: FrontierFile) -> None:
    """A run written before the study held its results (frontier.json was the store): its records move into the
    study once, so it resumes like any other; frontier.json is then derived again."""
    put_run(study, cfg, ff.run, ff.spec)
    if ff.baseline is not None:
        put_baseline(study, ff.baseline)
    for c in ff.controls:
        put_control(study, c)
    for c in ff.recipes:
        put_recipe(study, c)
    for c in ff.candidates:
        study.set_user_attr(A_RECORD + c.id, _json(c))
    study.set_user_attr(A_WALL, ff.run.wall_seconds)
    put_stopped(study, ff.run.stopped_because)


# ---- reading ---------------------------------------------------------------------------------------------------

def trial_records(study: optuna.Study) -> list[tuple[Any, Candidate]]:
    """(trial, candidate) for every finished trial holding its own record, in completion order.

    A record copied onto a retry (Optuna copies user attrs) names the old trial number and is ignored; a record on a
    trial that was failed by the heartbeat after writing it and then retried is ignored too (the retry counts). Only
    stale trials are retried, so a FAIL trial in a retry history was never told by its worker.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = []
    for t in trials:
        r = t.user_attrs.get(T_RECORD)
        if not r or r.get("trial_number") != t.number or not t.state.is_finished():
            continue
        if t.state == TrialState.FAIL and t.number in retried:
            continue
        out.append((t, Candidate.model_validate(r)))
    out.sort(key=lambda tc: (tc[0].datetime_complete or tc[0].datetime_start, tc[0].number))
    return out


def screened_records(study: optuna.Study) -> list[Screened]:
    """The proposals screened out by their prediction, in trial order (acf.coordinator.screening)."""
    return [Screened.model_validate(t.user_attrs[T_SCREENED]) for t in study.get_trials(deepcopy=False)
            if T_SCREENED in t.user_attrs and t.state == TrialState.PRUNED]


def _prefixed(attrs: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in attrs.items() if k.startswith(prefix)}


def frontier_from_study(study: optuna.Study, run_id: Optional[str] = None) -> FrontierFile:
    """The run's frontier file from the study alone: candidates in episode order (a shared run's, numbered in
    completion order), each scored against the baseline and the frontier replayed after each (hypervolume history);
    held-out metrics and artifact presence merged in."""
    attrs = study.user_attrs
    if not has_run(study):
        raise AcfError(f"study {study.study_name!r} holds no acf run (no acf config); was it made by `acf run`?")
    cfg = RunConfig.model_validate(attrs[A_CONFIG])
    meta = RunMeta.model_validate(attrs[A_RUN_META])
    meta.episodes = cfg.episodes
    if run_id:
        meta.run_id = run_id
    meta.stopped_because = attrs.get(A_STOPPED)
    ff = FrontierFile(run=meta, spec=attrs.get(A_SPEC, {}))
    finals = _prefixed(attrs, A_FINAL)

    def merged(c: Candidate) -> Candidate:
        f = finals.get(c.id)
        if f is not None:
            c.final_metrics = {k: Measurement.model_validate(m) for k, m in f["metrics"].items()}
            c.timings["final_evaluate"] = f["seconds"]
        return c

    if A_BASELINE in attrs:
        ff.baseline = merged(Candidate.model_validate(attrs[A_BASELINE]))
    ff.controls = [merged(Candidate.model_validate(r)) for _, r in sorted(_prefixed(attrs, A_CONTROL).items())]
    ff.recipes = [merged(Candidate.model_validate(r)) for r in _prefixed(attrs, A_RECIPE).values()]
    ff.recipes.sort(key=lambda c: (c.started_at or "", c.id))
    for c in ff.recipes:
        c.artifact_kept = bool(c.artifact and Path(c.artifact).is_dir())
    on_trials = trial_records(study)
    ff.screened = screened_records(study)
    loose = [Candidate.model_validate(r) for r in _prefixed(attrs, A_RECORD).values()]
    # a shared run's records carry episode 0 and are numbered by completion; a single process's carry their own
    numbered = sorted([c for _, c in on_trials if c.episode > 0] + [c for c in loose if c.episode > 0],
                      key=lambda c: c.episode)
    unnumbered = [c for _, c in on_trials if c.episode == 0] + [c for c in loose if c.episode == 0]
    if ff.baseline is not None:
        refresh_frontier(cfg, ff)
    for c in numbered + unnumbered:
        if c.episode == 0:
            c.episode = len(ff.candidates) + 1
        c.artifact_kept = bool(c.artifact and Path(c.artifact).is_dir())
        ff.candidates.append(merged(c))
        if ff.baseline is not None:
            score(cfg, ff.baseline.objectives, c)
            refresh_frontier(cfg, ff)
    if A_WALL in attrs:
        meta.wall_seconds = float(attrs[A_WALL])
    elif on_trials and A_STARTED in attrs:
        last = max((t.datetime_complete for t, _ in on_trials if t.datetime_complete), default=None)
        if last is not None:
            meta.wall_seconds = round(max(0.0, last.timestamp() - float(attrs[A_STARTED])), 1)
    return ff


def kept_model_ids(ff: FrontierFile) -> set[str]:
    """The candidates whose models a pruned run keeps: the frontier, the report headline's models and the best
    fixed recipe (the one rule prune_artifact_dirs applies; tests check a run against it)."""
    recipe = ff.best_fixed_recipe()
    return set(ff.frontier) | set(ff.headline_ids()) | ({recipe.id} if recipe is not None else set())


def prune_artifact_dirs(ff: FrontierFile) -> None:
    """Delete models of candidates off the frontier, but those the report's headline measures held out (acf's best
    at each recipe size; in runs before the yardstick, the best seeded recipe). Recipe models live in the recipe
    cache (acf.coordinator.yardstick keeps its frontier's). Safe from any process: a dominated candidate stays
    dominated, and one replaced as the best at a recipe size is not the best there again (the recipes are measured
    before the search)."""
    keep = kept_model_ids(ff)
    for c in ff.candidates:
        if c.artifact and c.id not in keep and Path(c.artifact).is_dir():
            shutil.rmtree(c.artifact, ignore_errors=True)
            c.artifact_kept = False


def publish(study: optuna.Study, run_dir: str | Path, prune: bool, run_id: Optional[str] = None) -> FrontierFile:
    """Derive the frontier from the study, delete models off it (`prune`: the run has no --keep-all) and write
    frontier.json atomically: the one path by which a single process, a coordinator and `acf rebuild` write it."""
    ff = frontier_from_study(study, run_id or Path(run_dir).name)
    if prune:
        prune_artifact_dirs(ff)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_frontier_file(ff, Path(run_dir) / "frontier.json")
    return ff


def open_run(ctx: RunContext) -> Optional[FrontierFile]:
    """A resumed single-process run's frontier, derived from its study (with the config it resumes with: --episodes
    may grow) and written at once; a run whose results are still only in an older frontier.json is adopted into the
    study first. A corrupt frontier.json is set aside, named, and rebuilt: nothing in it was not in the study.
    None when the run never got past its set-up."""
    if ctx.frontier_path.exists() and not ctx.cfg.storage and not (ctx.dir / "study.db").exists():
        load_frontier_file(ctx.frontier_path)   # a corrupt one is refused before an empty study is created
    study = ctx.study
    if not has_run(study) and ctx.frontier_path.exists():
        adopt_frontier_file(study, ctx.cfg, load_frontier_file(ctx.frontier_path))   # a corrupt one is refused
    if not has_run(study):
        return None
    if ctx.frontier_path.exists():
        try:
            load_frontier_file(ctx.frontier_path)
        except RunDirError as e:   # derived from the study, which holds every result: set aside, rebuilt below
            aside = ctx.frontier_path.with_name("frontier.json.corrupt")
            os.replace(ctx.frontier_path, aside)
            ctx.say(f"[yellow]{e}[/]: kept as {aside.name}; frontier.json is rebuilt from the study")
    put_config(study, ctx.cfg)
    return save_run(ctx)


def save_run(ctx: RunContext) -> FrontierFile:
    """After a single process wrote to its study: add its wall time, then derive and write frontier.json."""
    add_wall(ctx.study, ctx.lap())
    ctx.ff = publish(ctx.study, ctx.dir, prune=not ctx.cfg.keep_all)
    return ctx.ff

