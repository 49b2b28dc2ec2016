"""Persisted records: the frontier JSON schema (versioned) and the per-episode result.

Everything a run writes to disk is one of these pydantic models, so a notebook, `acf report` and `--resume`
read back exactly what was written, and a corrupt or foreign file is refused with its name.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from acf.core.atomic import read_json_strict, validate_strict
from acf.core.errors import RunDirError
from acf.methods.base import StepRecord
from acf.core.provenance import Measurement
from acf.methods.strategy import Strategy
from acf.search.surrogate import Prediction

SCHEMA_VERSION = 1

Status = Literal["ok", "failed", "pruned", "rejected", "skipped"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Candidate(BaseModel):
    id: str
    episode: int
    trial_number: Optional[int] = None
    strategy: Strategy
    description: str = ""
    status: Status = "ok"
    reason: Optional[str] = None
    proposed_by: str = "optuna"
    rationale: Optional[str] = None
    metrics: dict[str, Measurement] = Field(default_factory=dict)
    proxy_metrics: dict[str, Measurement] = Field(default_factory=dict)
    final_metrics: dict[str, Measurement] = Field(default_factory=dict)   # frontier members, --final-limit items
    objectives: dict[str, float] = Field(default_factory=dict)
    retention: Optional[float] = None
    reward: Optional[float] = None
    artifact: Optional[str] = None          # model directory (absolute), None once deleted or never made
    artifact_kept: bool = False
    steps: list[StepRecord] = Field(default_factory=list)
    #: id of the control row "baseline + this candidate's recovery steps, no compression" (task adaptation apart)
    control: Optional[str] = None
    timings: dict[str, float] = Field(default_factory=dict)
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    #: kld and size predicted before the episode ran (acf.search.surrogate): an estimate kept beside the
    #: measurement so the run shows how good its predictions were
    prediction: Optional[Prediction] = None
    #: the size this proposal was aimed at (acf.search.aim): {size, recipe_id, ratio, budget}; None: not aimed
    aim: Optional[dict[str, Any]] = None


class Screened(BaseModel):
    """A proposal not run: predicted, before any model was loaded, to be dominated by a clear margin by a measured
    point at no larger size (acf.coordinator.screening). Its trial is told PRUNED, so the sampler learns from it."""

    trial_number: int
    strategy: Strategy
    description: str = ""
    proposed_by: str = ""
    prediction: Prediction
    dominated_by: str
    dominated_kld: float
    dominated_size: float
    margin: float
    #: estimated time not spent: the median wall time of measured episodes (an estimate, not a measurement)
    saved_seconds: Optional[float] = None
    at: Optional[str] = None


class RunMeta(BaseModel):
    run_id: str
    model: str
    model_path: str
    dataset: str
    objectives: list[str]
    directions: dict[str, str]
    preset: str
    min_retention: Optional[float]
    sampler: str
    seed: int
    limit: Optional[int]
    proxy_limit: Optional[int]
    episodes: int
    device: str
    device_name: str = ""
    acf_version: str
    git_commit: Optional[str]
    runtime: str
    created_at: str
    updated_at: str
    command: list[str] = Field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_because: Optional[str] = None
    study_name: str = ""
    storage: str = ""
    max_kld: Optional[float] = None
    #: which test items rank candidates (search, its first proxy_limit the proxy) and which the final report uses
    item_sets: dict[str, Any] = Field(default_factory=dict)


class HVPoint(BaseModel):
    episode: int
    hypervolume: float


class Recommendation(BaseModel):
    id: str
    reward: float
    terms: dict[str, float]
    preset: str
    why: str


class FrontierFile(BaseModel):
    schema_version: int = SCHEMA_VERSION
    run: RunMeta
    spec: dict[str, Any]
    baseline: Optional[Candidate] = None
    candidates: list[Candidate] = Field(default_factory=list)
    #: reference rows, never frontier members: the baseline given a candidate's recovery steps and no compression
    controls: list[Candidate] = Field(default_factory=list)
    #: the fixed recipes of the yardstick (acf.search.recipes), measured like candidates; never frontier members:
    #: every claim is against the best of them at a size (`best_recipe_at`)
    recipes: list[Candidate] = Field(default_factory=list)
    #: proposals screened out by their prediction (never run, never episodes)
    screened: list[Screened] = Field(default_factory=list)
    frontier: list[str] = Field(default_factory=list)
    hypervolume: list[HVPoint] = Field(default_factory=list)
    reference_point: dict[str, float] = Field(default_factory=dict)
    recommended: Optional[Recommendation] = None

    def measured_recipes(self, metric: str = "kld") -> list[Candidate]:
        """The fixed recipes of this run's yardstick that were measured (`recipes`); a run written before the
        yardstick existed has its single-step seed recipes instead (GPTQ W4 plain/act-order, Q4_K_M)."""
        def ok(c: Candidate) -> bool:
            return (c.status == "ok" and metric in c.metrics and c.metrics[metric].value is not None
                    and "size" in c.metrics and c.metrics["size"].value is not None)

        if self.recipes:
            return [c for c in self.recipes if ok(c)]

        def legacy(c: Candidate) -> bool:
            if c.proposed_by != "seed recipe" or len(c.strategy.steps) != 1:
                return False
            st = c.strategy.steps[0]
            if st.params.get("avg_bits") is not None or st.params.get("layer_formats"):
                return False
            return st.method == "gptq" or (st.method == "gguf" and st.params.get("type") == "Q4_K_M")

        return [c for c in self.candidates if ok(c) and legacy(c)]

    def recipe_frontier(self, metric: str = "kld") -> list[Candidate]:
        """The recipes no other recipe beats at no larger size (lower `metric`), smallest first: the sizes at which
        acf's claims are stated."""
        out: list[Candidate] = []
        ranked = sorted(self.measured_recipes(metric), key=lambda c: (c.metrics["size"].value, c.metrics[metric].value))
        for c in ranked:
            if not out or c.metrics[metric].value < out[-1].metrics[metric].value:
                out.append(c)
        return out

    def best_recipe_at(self, size: float, metric: str = "kld") -> Optional[Candidate]:
        """The best fixed recipe at size S: the lowest `metric` among recipes no larger than S (None if none fits)."""
        fit = [c for c in self.measured_recipes(metric) if c.metrics["size"].value <= size]
        return min(fit, key=lambda c: c.metrics[metric].value) if fit else None

    def best_candidate_at(self, size: float, metric: str = "kld") -> Optional[Candidate]:
        """acf's most faithful candidate (an episode's, not a recipe) no larger than `size`."""
        fit = [c for c in self.candidates if c.status == "ok" and metric in c.metrics and "size" in c.metrics
               and c.metrics[metric].value is not None and c.metrics["size"].value <= size]
        return min(fit, key=lambda c: c.metrics[metric].value) if fit else None

    def headline_ids(self, metric: str = "kld") -> list[str]:
        """What the report's headline compares: each recipe of the recipe frontier and acf's best candidate at no
        larger size. Their models are kept and measured on the held-out items."""
        out: list[str] = []
        for r in self.recipe_frontier(metric):
            out.append(r.id)
            best = self.best_candidate_at(r.metrics["size"].value, metric)
            if best is not None:
                out.append(best.id)
        return list(dict.fromkeys(out))

    def best_fixed_recipe(self, metric: str = "kld") -> Optional[Candidate]:
        """The best fixed recipe at the recommended pick's size (the report compares the two); without a pick, or
        when no recipe is as small as it, the best recipe of all. Its model is kept and measured held out."""
        rec = self.measured_recipes(metric)
        if not rec:
            return None
        if self.recommended is not None:
            try:
                pick = self.candidate(self.recommended.id)
            except KeyError:
                pick = None
            size = (pick.metrics.get("size") if pick is not None else None)
            if size is not None and size.value is not None:
                at = self.best_recipe_at(size.value, metric)
                if at is not None:
                    return at
        return min(rec, key=lambda c: c.metrics[metric].value)

    def candidate(self, cid: str) -> Candidate:
        if self.baseline is not None and self.baseline.id == cid:
            return self.baseline
        for c in self.candidates + self.controls + self.recipes:
            if c.id == cid:
                return c
        raise KeyError(cid)


def load_frontier_file(path: str | Path) -> FrontierFile:
    """Read and validate a frontier.json; refuse (naming the file) a corrupt or other-version file."""
    path = Path(path)
    if path.is_dir():
        path = path / "frontier.json"
    raw = read_json_strict(path, "corrupt frontier file", RunDirError, missing="no such file (is this a run directory?)")
    ver = raw.get("schema_version") if isinstance(raw, dict) else None
    if ver != SCHEMA_VERSION:
        raise RunDirError(f"{path}: schema_version {ver!r}, this acf reads version {SCHEMA_VERSION}; "
                          f"use the acf version that wrote it")
    return validate_strict(FrontierFile, raw, path, "does not match the frontier schema", RunDirError)


def episodes_recorded(ff: Optional[FrontierFile]) -> int:
    """Episodes a run has recorded (0 before its frontier file exists): the pipeline's and the planner's count."""
    return 0 if ff is None else len(ff.candidates)


def save_frontier_file(ff: FrontierFile, path: str | Path) -> None:
    from acf.core.atomic import write_text

    ff.run.updated_at = now()
    write_text(path, ff.model_dump_json(indent=2))
