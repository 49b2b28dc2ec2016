"""The shared study as the run's store: create or join it (config, spec, run metadata, seed recipes) and rebuild
frontier.json from its records alone."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from .. import pipeline as P
from ..objectives import DIRECTIONS
from .. import records as REC
from .. import run_context as RC
from ..errors import AcfError
from ..search import open_study
from ..state import Candidate, FrontierFile, RunMeta, now, save_frontier_file
from .schema import (A_APPROVAL, A_BASELINE, A_CONFIG, A_RUN_META, A_SPEC, A_STARTED, A_STOPPED, T_RECORD)
from .storage import load_study, make_storage, study_config


def create_or_join(cfg: RC.RunConfig, storage: BaseStorage, approval: bool = False,
                   console=None) -> tuple[optuna.Study, str, Any]:
    """Create the shared study (config, spec, run metadata, seed recipes) or join it; refuse a study made for
    another model/task/objectives (`open_study`). Returns (study, resolved model path, model spec)."""
    from .. import __version__
    from ..models import resolve_model
    from ..provenance import device_string, git_commit, runtime_string
    from ..spec import infer_spec, spec_summary

    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "objectives": cfg.objectives}
    study = open_study(storage, cfg.study(), cfg.objectives, cfg.sampler, cfg.seed, meta)  # type: ignore[arg-type]
    attrs = study.user_attrs
    if A_CONFIG not in attrs:
        shared = cfg.model_copy(update={"storage": None, "interactive": False, "planner": None})
        study.set_user_attr(A_CONFIG, json.loads(shared.model_dump_json()))
        study.set_user_attr(A_SPEC, json.loads(json.dumps(spec_summary(spec))))
        study.set_user_attr(A_STARTED, time.time())
        rm = RunMeta(run_id=cfg.study(), model=cfg.model, model_path=str(model_path), dataset=cfg.dataset,
                     objectives=cfg.objectives, directions={o: DIRECTIONS[o] for o in cfg.objectives},
                     preset=cfg.preset, min_retention=cfg.min_retention, sampler=cfg.sampler, seed=cfg.seed,
                     limit=cfg.limit, proxy_limit=cfg.proxy_limit, episodes=cfg.episodes, device=cfg.device,
                     device_name=device_string(cfg.device), acf_version=__version__, git_commit=git_commit(),
                     runtime=runtime_string(), created_at=now(), updated_at=now(), command=cfg.command,
                     study_name=cfg.study(), storage=P.redact(cfg.storage_url()))
        study.set_user_attr(A_RUN_META, json.loads(rm.model_dump_json()))
    else:
        old = study_config(study)
        if old.episodes != cfg.episodes:  # joining with a larger --episodes extends the search, like --resume
            study.set_user_attr(A_CONFIG, {**attrs[A_CONFIG], "episodes": max(old.episodes, cfg.episodes)})
    study.set_user_attr(A_APPROVAL, bool(approval))
    if not study.trials:
        ctx = SimpleNamespace(cfg=cfg, spec=spec)
        from ..search import SearchSpace

        space = _space(ctx.cfg, spec, SearchSpace)
        for p in space.seeds() if cfg.sampler != "grid" else space.grid():
            study.enqueue_trial(p, skip_if_exists=True)
    return study, str(model_path), spec


def _space(cfg: RC.RunConfig, spec, SearchSpace) -> Any:
    kw = {}
    if cfg.quant_methods:
        kw["quant_methods"] = cfg.quant_methods
    if cfg.prune_methods:
        kw["prune_methods"] = cfg.prune_methods
    return SearchSpace(spec, cfg.device, cfg.calib_samples, cfg.seq_len, cfg.recover_steps, **kw)


def cid_for(number: int) -> str:
    """Candidate ids are trial numbers: unique across workers (the single-process graph uses episode numbers)."""
    return f"t{number:03d}"


def _records(study: optuna.Study) -> list[tuple[Any, Candidate]]:
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


def frontier_from_study(study: optuna.Study, run_id: Optional[str] = None) -> FrontierFile:
    """The frontier file a single process would have written for the same recorded trials, from the study alone."""
    attrs = study.user_attrs
    if A_CONFIG not in attrs or A_RUN_META not in attrs:
        raise AcfError(f"study {study.study_name!r} was not made by `acf run --workers` (no acf config)")
    cfg = RC.RunConfig.model_validate(attrs[A_CONFIG])
    meta = RunMeta.model_validate(attrs[A_RUN_META])
    meta.episodes = cfg.episodes
    if run_id:
        meta.run_id = run_id
    meta.stopped_because = attrs.get(A_STOPPED)
    ff = FrontierFile(run=meta, spec=attrs.get(A_SPEC, {}))
    if A_BASELINE in attrs:
        ff.baseline = Candidate.model_validate(attrs[A_BASELINE])
    ns = SimpleNamespace(ff=ff, cfg=cfg)
    recs = _records(study)
    for i, (t, c) in enumerate(recs, 1):
        c.episode = i
        c.artifact_kept = bool(c.artifact and Path(c.artifact).is_dir())
        ff.candidates.append(c)
        if ff.baseline is not None:
            REC.score(cfg, ff.baseline.objectives, c)
            REC.refresh_frontier(ns)  # type: ignore[arg-type]
    if recs:
        last = max((t.datetime_complete for t, _ in recs if t.datetime_complete), default=None)
        if last is not None and A_STARTED in attrs:
            meta.wall_seconds = round(max(0.0, last.timestamp() - float(attrs[A_STARTED])), 1)
    return ff


def rebuild_frontier(storage: str | BaseStorage, study_name: str, run_dir: str | Path,
                     prune_artifacts: bool = False) -> FrontierFile:
    """Rebuild run_dir/frontier.json from the study alone (any worker, the coordinator, or later `acf report`)."""
    st = make_storage(storage, heartbeat_interval=None) if isinstance(storage, str) else storage
    url = storage if isinstance(storage, str) else "storage"
    study = load_study(st, url, study_name)
    ff = frontier_from_study(study, Path(run_dir).name)
    if prune_artifacts and not study_config(study).keep_all:
        prune_artifact_dirs(ff)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_frontier_file(ff, Path(run_dir) / "frontier.json")
    return ff


def prune_artifact_dirs(ff: FrontierFile) -> None:
    """Delete models of candidates off the frontier. Safe from any process: a dominated candidate stays dominated."""
    for c in ff.candidates:
        if c.artifact and c.id not in ff.frontier and Path(c.artifact).is_dir():
            shutil.rmtree(c.artifact, ignore_errors=True)
            c.artifact_kept = False
