"""The run's configuration (RunConfig, validated before anything runs) and its live objects (RunContext: task,
spec, study, the frontier derived from it, the baseline's references and the candidate in memory), rebuilt from the
run directory on demand so a killed run resumes from disk."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import optuna
from pydantic import BaseModel, Field

from acf.core.errors import AcfError, RunDirError
from acf.core.metrics import names
from acf.core.objectives import DIRECTIONS, FIDELITY, QUALITY, parse_objectives
from acf.planner import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, check_settings as check_planner_settings
from acf.search.reward import PRESETS
from acf.search.space import SAMPLERS, SearchSpace, open_study
from acf.coordinator.state import FrontierFile
from acf.methods.base import DEFAULT_CALIB_MIX

log = logging.getLogger(__name__)

CHEAP_METRICS = names(cheap=True)
#: fidelity to the baseline, measured for every candidate of every run (the search ranks by kld by default)
FIDELITY_MEASURED = names(family="fidelity")
#: the objectives of a run that names none: damage and size; latency joins them only where it is measured in the
#: format's deployment runtime (llama.cpp for GGUF). Elsewhere (compressed-tensors in transformers' dequantized path)
#: latency is measured and reported with its runtime, never ranked on unless asked for (SPEC.md, "Objectives")
DEFAULT_OBJECTIVES = "kld,size"
DEPLOYED_LATENCY_RUNTIMES = ("llamacpp",)


def default_objectives(runtime: str) -> list[str]:
    return DEFAULT_OBJECTIVES.split(",") + (["latency"] if runtime in DEPLOYED_LATENCY_RUNTIMES else [])
#: default --max-kld (nats/token): chosen from experiments/results/fidelity-*.md, see SPEC.md
DEFAULT_MAX_KLD = 0.5
RUNTIMES = ("transformers", "llamacpp")
#: metrics that depend on the runtime: with --runtime llamacpp the baseline's come from its F16 GGUF in llama.cpp
RUNTIME_METRICS = names(where="runtime")


class RunConfig(BaseModel):
    """Everything that defines a run; saved as run_config.json so `--resume` needs only the directory."""

    model: str = "smollm2-135m"
    #: a task name, or the absolute path of the user's own .jsonl/.csv file (acf.tasks.custom)
    dataset: str = "gsm8k"
    data_dir: Optional[str] = None
    #: own data only: share of the file's rows kept for calibration (None: the default, recorded once bound)
    train_share: Optional[float] = None
    #: own data only: generation accuracy by `exact` or `regex:PATTERN` (None: no accuracy metric)
    scorer: Optional[str] = None
    #: own data only, recorded when the run starts: the file's SHA-256 (a resume with a changed file is refused)
    #: and its train/test split (acf.tasks.own_data.describe_split)
    dataset_sha256: Optional[str] = None
    dataset_split: Optional[dict[str, Any]] = None
    #: calibration text apart from the evaluation data (acf.tasks.calib_text): the absolute path of a .txt/.jsonl/.csv
    #: file whose texts replace the task's train split in every calibration and training step; its SHA-256 is
    #: recorded when the run starts and checked on every later build (resume, workers), like a dataset file's
    calib_data: Optional[str] = None
    calib_data_sha256: Optional[str] = None
    episodes: int = 4
    run_dir: str
    interactive: bool = False
    sampler: str = "tpe"
    preset: str = "balanced"
    objectives: list[str] = Field(default_factory=lambda: DEFAULT_OBJECTIVES.split(","))
    min_retention: Optional[float] = 0.9
    max_kld: Optional[float] = DEFAULT_MAX_KLD
    controls: bool = True
    limit: Optional[int] = 100
    proxy_limit: Optional[int] = 24
    accuracy_limit: Optional[int] = None
    final_limit: Optional[int] = None
    final_metrics: Optional[list[str]] = None
    budget_minutes: Optional[float] = None
    patience: Optional[int] = None
    seed: int = 0
    storage: Optional[str] = None
    study_name: Optional[str] = None
    device: str = "cpu"
    keep_all: bool = False
    calib_samples: int = 64
    seq_len: int = 512
    #: share of calibration windows (and kd_tune examples) drawn from general text rather than the task's train
    #: split (acf.methods.calibration): statistics fitted to the task alone travel badly to other text
    calib_mix: float = DEFAULT_CALIB_MIX
    #: the fixed recipes of the yardstick (acf.search.recipes); None: every recipe the model admits
    recipes: Optional[list[str]] = None
    recover_steps: list[int] = Field(default_factory=lambda: [25, 50, 100])
    #: step choices of kd_tune after a weight-only quantizer; tune_methods narrows the tune slot ("none" only: off)
    tune_steps: list[int] = Field(default_factory=lambda: [50, 100, 200])
    tune_methods: Optional[list[str]] = None
    eval_batch_size: Optional[int] = None
    latency_tokens: int = 32
    trust_remote_code: bool = False
    #: go on although the baseline sanity check (acf.models.sanity) finds the model implausible (experts: e.g. a model
    #: that is meant to be odd); the check is then not run, or its recorded failure is overridden on resume
    skip_sanity: bool = False
    min_free_disk_bytes: Optional[int] = None
    quant_methods: Optional[list[str]] = None
    prune_methods: Optional[list[str]] = None
    #: deployment target: where latency/ttft/throughput/memory are measured. llamacpp: every candidate ends in a
    #: GGUF measured in llama.cpp on the CPU, and the baseline's cost metrics come from its F16 GGUF there too
    runtime: str = "transformers"
    planner: Optional[str] = None
    planner_share: float = 0.5
    planner_max_calls: int = 50
    planner_timeout: float = DEFAULT_TIMEOUT_S
    planner_retries: int = DEFAULT_RETRIES
    command: list[str] = Field(default_factory=list)

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.run_dir).resolve() / 'study.db'}"

    def study(self) -> str:
        return self.study_name or f"acf-{Path(self.run_dir).name}"


def task_for(cfg: RunConfig):
    """The run's task, with the run's own-data settings; for a dataset file, the file is bound to the run: its
    digest and split are recorded in `cfg` at the start and checked on every later build (resume, workers)."""
    from acf.tasks import get_task

    task = get_task(cfg.dataset, cfg.data_dir, train_share=cfg.train_share, scorer=cfg.scorer)
    bind_dataset(cfg, task)
    return task


def bind_dataset(cfg: RunConfig, task) -> None:
    """Record a dataset file's SHA-256 and split in `cfg` (a new run), or refuse a file that changed since they
    were recorded: the run's items, baseline references, recipes and calibration all came from the old content."""
    digest = getattr(task, "sha256", None)
    if digest is None:
        return
    if cfg.dataset_sha256 is None:
        cfg.dataset_sha256 = digest
        cfg.train_share = task.train_share
        cfg.dataset_split = task.split_facts
        return
    if cfg.dataset_sha256 != digest:
        from acf.core.errors import DataError

        raise DataError(f"--dataset {cfg.dataset}: the file changed since this run started (sha256 "
                        f"{cfg.dataset_sha256[:12]}... recorded in run_config.json, now {digest[:12]}...); its items, "
                        f"references and calibration came from the recorded content: restore that file, or start a "
                        f"new run")


def calibration_task(cfg: RunConfig, task):
    """The task calibration and training read: `task` itself, or with `--calib-data` the task with its train texts
    taken from the file (acf.tasks.calib_text), the file bound to the run (`bind_calib_data`)."""
    if not cfg.calib_data:
        return task
    from acf.tasks.calib_text import CalibTextTask

    return CalibTextTask(task, bind_calib_data(cfg))


def bind_calib_data(cfg: RunConfig):
    """Read and check the `--calib-data` file (FILE:LINE for a bad line); record its SHA-256 in `cfg` (a new run), or
    refuse a file that changed since it was recorded: the run's recipes and calibrated episodes came from the old
    text. Returns the file's CalibData."""
    from acf.core.errors import DataError
    from acf.tasks.calib_text import read_calib_data

    data = read_calib_data(cfg.calib_data)
    if cfg.calib_data_sha256 is None:
        cfg.calib_data_sha256 = data.sha256
    elif cfg.calib_data_sha256 != data.sha256:
        raise DataError(f"--calib-data {cfg.calib_data}: the file changed since this run started (sha256 "
                        f"{cfg.calib_data_sha256[:12]}... recorded in run_config.json, now {data.sha256[:12]}...); its "
                        f"recipes and calibrated candidates came from the recorded text: restore that file, or start "
                        f"a new run")
    return data


def validate_config(cfg: RunConfig, task_metrics: tuple[str, ...]) -> RunConfig:
    if cfg.episodes < 1:
        raise AcfError(f"--episodes must be at least 1 (got {cfg.episodes})")
    if cfg.sampler not in SAMPLERS:
        raise AcfError(f"unknown sampler {cfg.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if cfg.preset not in PRESETS:
        raise AcfError(f"unknown preset {cfg.preset!r}: choose from {', '.join(PRESETS)}")
    cfg.objectives = parse_objectives(cfg.objectives, task_metrics)
    ranked_cost = [o for o in cfg.objectives if o in RUNTIME_METRICS]
    if ranked_cost and cfg.runtime not in DEPLOYED_LATENCY_RUNTIMES:
        log.warning("objective(s) %s measured in %s, not in a deployment runtime (compressed-tensors runs "
                    "dequantized there): ranking on them ranks that path's speed, not the deployed model's",
                    ", ".join(ranked_cost), cfg.runtime)
    for name in ("limit", "proxy_limit", "accuracy_limit"):
        v = getattr(cfg, name)
        if v is not None and v <= 0:
            raise AcfError(f"--{name.replace('_', '-')} must be positive (got {v})")
    if cfg.final_limit is not None and cfg.final_limit <= 0:
        raise AcfError(f"--final-limit must be positive (got {cfg.final_limit})")
    if cfg.final_limit and not cfg.limit:
        raise AcfError("--final-limit reports on test items the search did not see, which needs a --limit for the "
                       "search (with no --limit the search uses every test item)")
    if cfg.final_metrics is not None:
        # checked now, not when the final evaluation reaches them after the whole search
        offered = set(task_metrics) | {m for m in DIRECTIONS if m not in QUALITY} | FIDELITY
        names = [m.strip() for m in cfg.final_metrics if m.strip()]
        bad = [m for m in names if m not in offered]
        if bad or not names:
            raise AcfError(f"--final-metrics: {', '.join(bad) or '(none given)'} not measured on this task; choose "
                           f"from {', '.join(sorted(offered))}")
        cfg.final_metrics = names
    if cfg.proxy_limit and cfg.limit and cfg.proxy_limit >= cfg.limit:
        cfg.proxy_limit = None  # a proxy as large as the full evaluation saves nothing
    if cfg.min_retention is not None and not (0 < cfg.min_retention <= 1.5):
        raise AcfError(f"--min-retention must lie in (0, 1.5] (got {cfg.min_retention})")
    if cfg.max_kld is not None and not (0 < cfg.max_kld <= 20):
        raise AcfError(f"--max-kld must lie in (0, 20] nats/token (got {cfg.max_kld})")
    if not cfg.recover_steps or any(not 1 <= s <= 100_000 for s in cfg.recover_steps):
        raise AcfError(f"--recover-steps: give one or more step counts in 1..100000 (got {cfg.recover_steps})")
    if not cfg.tune_steps or any(not 1 <= s <= 100_000 for s in cfg.tune_steps):
        raise AcfError(f"--tune-steps: give one or more step counts in 1..100000 (got {cfg.tune_steps})")
    from acf.methods.registry import choices

    if cfg.runtime not in RUNTIMES:
        raise AcfError(f"--runtime {cfg.runtime!r}: choose from {', '.join(RUNTIMES)}")
    if cfg.runtime == "llamacpp":
        if cfg.device.startswith("cuda"):
            raise AcfError("--runtime llamacpp measures on the CPU (this llama.cpp build has no CUDA): use --device cpu")
        other = [m for m in (cfg.quant_methods or []) if m != "gguf"]
        if other:
            raise AcfError(f"--runtime llamacpp runs GGUF files only, so every candidate ends in a gguf step: "
                           f"--quant-methods {','.join(cfg.quant_methods or [])} names {', '.join(other)}; use gguf")
        cfg.quant_methods = ["gguf"]
    for flag, given, valid in (("--quant-methods", cfg.quant_methods, choices("quant", everything=True)),
                               ("--prune-methods", cfg.prune_methods, choices("prune", everything=True)),
                               ("--tune-methods", cfg.tune_methods, choices("tune", everything=True))):
        if given is None:
            continue
        bad = [m for m in given if m not in valid]
        if bad or not given:
            raise AcfError(f"{flag}: unknown method(s) {', '.join(bad) or '(none given)'}; choose from "
                           f"{', '.join(valid)}")
    q = cfg.quant_methods if cfg.quant_methods is not None else choices("quant")
    p = cfg.prune_methods if cfg.prune_methods is not None else choices("prune")
    if all(m == "none" for m in q) and all(m == "none" for m in p):
        raise AcfError("--quant-methods and --prune-methods leave nothing to search (both only 'none')")
    if not 0.0 <= cfg.calib_mix <= 1.0:
        raise AcfError(f"--calib-mix is the share of calibration text from outside the task: give 0..1 "
                       f"(got {cfg.calib_mix})")
    if cfg.recipes is not None:
        from acf.search.recipes import NAME_PATTERN

        names = [n.strip() for n in cfg.recipes if n.strip()]
        bad = [n for n in names if n != "none" and not NAME_PATTERN.match(n)]
        if bad:
            raise AcfError(f"--recipes: {', '.join(bad)} is not a recipe name; recipes are named like gptq_w4g64_ao, "
                           f"awq_w4g64, autoround_w3g64, gptq_w8_ao, w8a8, gguf_q4_k_m_imat ('none' for no yardstick)")
        cfg.recipes = names
    if cfg.calib_data:
        bind_calib_data(cfg)   # a bad line or a changed file is refused before any model loads
    # before the run dir is written: a bad value must not leave a half-made run behind
    check_planner_settings(cfg.planner_share, cfg.planner_max_calls, cfg.planner_timeout, cfg.planner_retries)
    return cfg


def check_calibration(cfg: RunConfig, model_path: str | Path) -> None:
    """The run's calibration windows can be filled from its data, or its `--calib-data` file
    (acf.methods.calibration.check_supply): checked
    once before the run starts rather than failing every calibrated episode and recipe alike."""
    from transformers import AutoTokenizer

    from acf.methods.calibration import check_supply

    tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=cfg.trust_remote_code)
    check_supply(tok, calibration_task(cfg, task_for(cfg)), cfg.calib_samples, cfg.seq_len, cfg.calib_mix)


def make_run_dir(run_dir: str | Path) -> Path:
    """Create the run directory, or refuse with RunDirError naming it and why (a file where a folder must be, no
    permission): mkdir's own NotADirectoryError/PermissionError came out as a traceback. Called after the settings
    are validated and before anything is written."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            why = f"{blocker} is a file, not a directory"
        else:
            why = e.strerror or type(e).__name__
        raise RunDirError(f"--run-dir {run_dir}: cannot create the run directory ({why})") from None
    return run_dir


def space_for(cfg: RunConfig, spec) -> SearchSpace:
    """The run's search space: the model's spec narrowed by --quant-methods / --prune-methods."""
    kw = {}
    if cfg.quant_methods:
        kw["quant_methods"] = cfg.quant_methods
    if cfg.prune_methods:
        kw["prune_methods"] = cfg.prune_methods
    if cfg.tune_methods:
        kw["tune_methods"] = cfg.tune_methods
    return SearchSpace(spec, cfg.device, cfg.calib_samples, cfg.seq_len, cfg.recover_steps, tune_steps=cfg.tune_steps,
                       **kw)


class RunPaths:
    """Where a run's files go: RUN_DIR/frontier.json, episodes/NNN (a user's copy of each episode), artifacts/<cid>
    (candidate models). A shared study's workers lay theirs out otherwise (acf.distributed.worker.SharedPaths)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def frontier_path(self) -> Path:
        return self.root / "frontier.json"

    def episode_dir(self, episode: int) -> Path:
        return self.root / "episodes" / f"{episode:03d}"

    def artifact_dir(self, cid: str) -> Path:
        return self.root / "artifacts" / cid


class RunContext:
    """The run's live objects (task, spec, study, frontier) rebuilt from the run directory on demand. `ff` is the
    frontier derived from the study (`acf.coordinator.run_store`), refreshed by every write; it is a view, never
    written to. A caller that holds the study or the spec already (a shared study's coordinator, a worker) hands
    them in; `paths` says where files go (default: the run directory's layout, `RunPaths`)."""

    def __init__(self, cfg: RunConfig, console=None, *, paths: Optional[RunPaths] = None,
                 study: Optional[optuna.Study] = None, spec=None):
        from rich.console import Console

        self.cfg = cfg
        self.paths = paths or RunPaths(cfg.run_dir)
        self.dir = self.paths.root
        self.console = console or Console(stderr=False)
        self.task = task_for(cfg)
        #: what calibration and training read: the task, or the task with its `--calib-data` file's texts
        self.calib_task = calibration_task(cfg, self.task)
        self._study: Optional[optuna.Study] = study
        self._space: Optional[SearchSpace] = None
        self._spec = spec
        self.ff: Optional[FrontierFile] = None
        self.t_start = time.time()   # when this process's wall time since it last stored it began (`lap`)
        self.planner = None
        self._references: Optional[Any] = None   # acf.evaluation.references.BaselineReferences, made on first use
        self._loaded: Optional[tuple[str, Any]] = None

    # ---- paths -------------------------------------------------------------------------------------------
    @property
    def frontier_path(self) -> Path:
        return self.paths.frontier_path

    def episode_dir(self, episode: int) -> Path:
        return self.paths.episode_dir(episode)

    def artifact_dir(self, cid: str) -> Path:
        return self.paths.artifact_dir(cid)

    def lap(self) -> float:
        """The seconds since the last lap (or this process's start), starting the next: the wall time a process adds
        to its run's when it stores a result."""
        now = time.time()
        seconds, self.t_start = now - self.t_start, now
        return seconds

    def run_seconds(self) -> float:
        """The run's wall time so far: what its earlier processes stored, and this one's since it last stored."""
        assert self.ff is not None
        return self.ff.run.wall_seconds + (time.time() - self.t_start)

    # ---- lazily rebuilt objects --------------------------------------------------------------------------
    @property
    def spec(self):
        if self._spec is None:
            from acf.models.spec import load_spec

            self._spec = load_spec(self.dir / "model_spec.json")
        return self._spec

    @spec.setter
    def spec(self, spec) -> None:
        """The model's spec, once inferred (a new run, a worker): not read back from model_spec.json."""
        self._spec = spec
        self._space = None

    @property
    def space(self) -> SearchSpace:
        if self._space is None:
            self._space = space_for(self.cfg, self.spec)
        return self._space

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            meta = {"model": self.cfg.model, "dataset": self.cfg.dataset, "objectives": self.cfg.objectives}
            self._study = open_study(self.cfg.storage_url(), self.cfg.study(), self.cfg.objectives, self.cfg.sampler,
                                     self.cfg.seed, meta)
        return self._study

    # ---- the baseline's references and the candidate in memory ------------------------------------------------
    def fidelity(self, part: str = "search", loaded=None):
        """The baseline references for the search items (`part="search"`) or the final report's held-out items
        ("report"): the run's `evaluation.references.BaselineReferences`, kept under RUN_DIR/reference/."""
        if self._references is None:
            from acf.evaluation.references import BaselineReferences

            assert self.ff is not None
            self._references = BaselineReferences(
                self.ff.run.model_path, self.task, self.dir / "reference", device=self.cfg.device, seed=self.cfg.seed,
                item_range=self.item_range, eval_batch_size=self.cfg.eval_batch_size,
                trust_remote_code=self.cfg.trust_remote_code, say=self.say)
        return self._references.get(part, loaded)

    def item_range(self, part: str) -> tuple[int, Optional[int]]:
        """(offset, count) in the test split's seeded permutation: search items first, the report's after them."""
        if part == "search":
            return 0, self.cfg.limit
        return (self.cfg.limit or 0), self.cfg.final_limit

    def loaded(self, cid: str, path: Path):
        """The candidate `cid` in memory, loaded once per episode for its proxy and its full evaluation."""
        from acf.evaluation.runner import Loaded

        if self._loaded is not None and self._loaded[0] == cid:
            return self._loaded[1]
        self.release()
        ld = Loaded.load(path, self.cfg.device, self.cfg.trust_remote_code)
        self._loaded = (cid, ld)
        return ld

    def release(self) -> None:
        if self._loaded is not None:
            self._loaded[1].free()
            self._loaded = None

    def say(self, msg: str) -> None:
        self.console.print(msg)
