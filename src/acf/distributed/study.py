"""The shared study: create or join it (config, spec, run metadata and seed recipes, stored as `acf.coordinator.run_store`
stores every run) and rebuild frontier.json from it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage

from acf.coordinator.run_context import RunConfig, space_for
from acf.coordinator.run_stages import run_meta
from acf.coordinator.run_store import A_CONFIG, has_run, publish, put_run
from acf.search.space import enqueue_first, open_study
from acf.coordinator.state import FrontierFile
from acf.distributed.schema import A_APPROVAL
from acf.distributed.storage import load_study, make_storage, study_config


def create_or_join(cfg: RunConfig, storage: BaseStorage, approval: bool = False,
                   console=None) -> tuple[optuna.Study, str, Any]:
    """Create the shared study (config, spec, run metadata, seed recipes) or join it; refuse a study made for
    another model/task/objectives (`open_study`). Returns (study, resolved model path, model spec)."""
    from acf.models.loading import resolve_model
    from acf.models.spec import infer_spec, spec_summary

    model_path = resolve_model(cfg.model)
    spec = infer_spec(model_path, cfg.trust_remote_code)
    meta = {"model": cfg.model, "dataset": cfg.dataset, "objectives": cfg.objectives}
    study = open_study(storage, cfg.study(), cfg.objectives, cfg.sampler, cfg.seed, meta)  # type: ignore[arg-type]
    attrs = study.user_attrs
    if not has_run(study):
        rm = run_meta(cfg, str(model_path), cfg.study())
        put_run(study, cfg, rm, spec_summary(spec))
    else:
        old = study_config(study)
        if old.episodes != cfg.episodes:  # joining with a larger --episodes extends the search, like --resume
            study.set_user_attr(A_CONFIG, {**attrs[A_CONFIG], "episodes": max(old.episodes, cfg.episodes)})
    study.set_user_attr(A_APPROVAL, bool(approval))
    if not study.trials:
        enqueue_first(study, space_for(cfg, spec), cfg.sampler)
    return study, str(model_path), spec


def cid_for(number: int) -> str:
    """Candidate ids are trial numbers: unique across workers (the single-process graph uses episode numbers)."""
    return f"t{number:03d}"


def rebuild_frontier(storage: str | BaseStorage, study_name: str, run_dir: str | Path,
                     prune_artifacts: bool = False) -> FrontierFile:
    """Rebuild run_dir/frontier.json from the study alone (any worker, the coordinator, or later `acf report`)."""
    st = make_storage(storage, heartbeat_interval=None) if isinstance(storage, str) else storage
    url = storage if isinstance(storage, str) else "storage"
    study = load_study(st, url, study_name)
    return publish(study, run_dir, prune=prune_artifacts and not study_config(study).keep_all)
