"""The Optuna side of the search: a conditional space built from the model spec, samplers, seeds, ask/tell.

One study per run (SQLite in the run dir by default; any Optuna storage URL works), so a killed run resumes
with the sampler's full history, and several processes could share one study.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import optuna

from acf.core.errors import AcfError
from acf.core.objectives import DIRECTIONS
from acf.methods.fragments import BUDGET, on_grid
from acf.methods.gguf_mixed import DEFAULT_BUDGETS, DEFAULT_TYPES, min_bits, q4km_bits_estimate, shapes_from_spec
from acf.methods.mixed import default_formats, min_effective_bits, target_palette
from acf.methods.nominal import format_bits, quantizable_shapes
from acf.methods.params import MixedPrecision
from acf.methods.registry import choices, get as get_method, grid_methods
from acf.methods.strategy import Step, Strategy
from acf.models.gguf_file import type_problems
from acf.models.spec import ModelSpec

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random", "grid")
DEFAULT_SAMPLER = "tpe"

#: "uniform" (one bits/group_size for every layer) or an effective-bits budget for a per-layer allocation
#: (acf.methods.mixed), a continuous dimension (`budget`) spanning the fixed recipes' sizes: what moves damage at a
#: size is where the bits go, so the search explores budgets, not layers. A benchmark may give a finite list instead
#: (e.g. ["uniform", "4.25", "5.0"]: the categorical space earlier runs used)
PRECISION_CHOICES = ["uniform", BUDGET]
#: the budget dimension's step (bits per weight) and its top: 8 bits is the W8 recipes' size
BUDGET_STEP = 0.125
BUDGET_MAX = 8.0
#: GGUF types the search picks from (those the model's shapes admit: acf.models.gguf_file.type_problems)
GGUF_TYPE_CHOICES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M")


class SearchSpace:
    """The conditional space. Every strategy it yields passes `validate_strategy` for this spec."""

    def __init__(self, spec: ModelSpec, device: str = "cpu", calib_samples: int = 64, seq_len: int = 512,
                 recover_steps: Sequence[int] = (25, 50, 100), quant_methods: Optional[Sequence[str]] = None,
                 prune_methods: Optional[Sequence[str]] = None, *, recover_methods: Optional[Sequence[str]] = None,
                 bits: Sequence[int] = (4, 8), group_sizes: Optional[Sequence[str]] = None,
                 sparsities: Optional[Sequence[float]] = None, patterns: Sequence[str] = ("unstructured", "2:4"),
                 drops: Optional[Sequence[int]] = None, act_order: Sequence[bool] = (False, True),
                 precisions: Optional[Sequence[str]] = None,
                 gguf_types: Optional[Sequence[str]] = None, gguf_imatrix: Sequence[bool] = (True, False),
                 gguf_precisions: Optional[Sequence[str]] = None, tune_methods: Optional[Sequence[str]] = None,
                 tune_steps: Sequence[int] = (50, 100, 200)):
        """Defaults are acf's full space (the registry's default choices per slot: acf.methods.registry.choices);
        the keyword arguments narrow it (benchmarks replay a finite space)."""
        self.spec = spec
        self.device = device
        self.calib = {"calib_samples": calib_samples, "seq_len": seq_len}
        self.recover_steps = list(recover_steps)
        gs = [g for g in spec.valid_group_sizes if g >= 32] or spec.valid_group_sizes
        self.group_sizes = list(group_sizes) if group_sizes else [str(g) for g in sorted(gs)[-2:]] + ["channel"]
        self.max_drop = max(1, spec.num_layers // 4)
        self.quant_methods = list(quant_methods if quant_methods is not None else choices("quant"))
        self.prune_methods = list(prune_methods if prune_methods is not None else choices("prune"))
        if not [q for q in self.quant_methods if q != "none"]:
            # without a quantization method, "no pruning" would be the baseline itself: not a candidate
            self.prune_methods = [p for p in self.prune_methods if p != "none"]
        if not self.prune_methods:
            raise ValueError("the search space is empty: choose at least one quantization or pruning method")
        self.recover_methods = list(recover_methods if recover_methods is not None else choices("recover"))
        # after a weight-only quantizer (MethodSpec.tunable): train what it kept in 16 bits (kd_tune), or not
        self.tune_methods = list(tune_methods if tune_methods is not None else choices("tune"))
        self.tune_steps = list(tune_steps)
        self.bits = list(bits)
        self.sparsities = list(sparsities) if sparsities else None
        self.patterns = list(patterns)
        self.drops = list(drops) if drops else None
        self.act_order = list(act_order)
        self.precisions = [str(p) for p in (precisions if precisions is not None else PRECISION_CHOICES)] or ["uniform"]
        #: (lo, hi, step) of the continuous budget: from the smallest size the default palette reaches to W8's
        self.budget_range = self._budget_range() if BUDGET in self.precisions else None

        widths = spec.linear_widths(("lm_head",))
        self.gguf_types = [t for t in (gguf_types or GGUF_TYPE_CHOICES) if not type_problems(t, widths, {})]
        if "gguf" in self.quant_methods and not self.gguf_types:
            raise ValueError("gguf: none of the GGUF types fits this model's layer widths")
        self.gguf_imatrix = list(gguf_imatrix)
        self.gguf_precisions = self._gguf_budgets(gguf_precisions)

    def _budget_range(self) -> tuple[float, float, float]:
        # the default target's palette and fused groups (vllm: no 3-bit, one format per q/k/v): a budget below
        # what they reach would only fail validation
        target = MixedPrecision.model_fields["target"].default
        lo = min_effective_bits(quantizable_shapes(self.spec), target_palette(default_formats(self.spec.valid_group_sizes),
                                                                   target),
                                self.spec.bytes_per_param, target, self.spec.family)
        # the range ends at the uniform W8 recipe's size (8 bits plus its per-channel scales, a little above 8.0):
        # a budget of exactly 8.0 cannot reach it, so acf could never match the best recipe there (measured in
        # cpu16-search: budget 8.0 vs W8's 8.03 bits)
        return _grid_up(lo), max(BUDGET_MAX, _grid_up(format_bits("w8", self.spec))), BUDGET_STEP

    def _gguf_shapes(self) -> list:
        return shapes_from_spec(self.spec)

    def _gguf_budgets(self, given: Optional[Sequence[str]]) -> list[str]:
        """"uniform" and the per-tensor budgets (bits per weight, embedding included) this model can reach with the
        default palette: a budget below the palette's smallest size would only fail its episode."""
        self.gguf_budget_range: Optional[tuple[float, float, float]] = None
        if given is not None:
            return [str(g) for g in given] or ["uniform"]
        lo = _grid_up(min_bits(self._gguf_shapes(), list(DEFAULT_TYPES)))
        hi = max(BUDGET_MAX, max(DEFAULT_BUDGETS))
        if lo > hi:
            return ["uniform"]
        self.gguf_budget_range = (lo, hi, BUDGET_STEP)
        return ["uniform", BUDGET]

    def suggest(self, trial: optuna.Trial) -> Strategy:
        """prune (or none) -> recovery (only after pruning) -> quantization -> tune (only after a weight-only
        quantizer); each chosen method's own params come from its registry search fragment."""
        steps: list[Step] = []
        prune = trial.suggest_categorical("prune", self.prune_methods)
        if prune != "none":
            steps.append(self._step(prune, trial))
            rec = trial.suggest_categorical("recover", self.recover_methods)
            if rec != "none":
                steps.append(self._step(rec, trial))
            quant = trial.suggest_categorical("quant", self.quant_methods)
        else:
            quant = trial.suggest_categorical("quant_only", [q for q in self.quant_methods if q != "none"])
        if quant != "none":
            steps.append(self._step(quant, trial))
            if self.tunes(quant):
                tune = trial.suggest_categorical("tune", self.tune_methods)
                if tune != "none":
                    steps.append(self._step(tune, trial))
        return Strategy(steps=steps)

    def tunes(self, quant: str) -> bool:
        """Whether the space asks for a tune step after this quantizer."""
        info = get_method(quant)
        return info is not None and info.tunable and any(t != "none" for t in self.tune_methods)

    def untuned(self, quant: str) -> dict[str, str]:
        """The trial params that say "no tune step" after this quantizer (empty where the space asks none)."""
        return {"tune": "none"} if self.tunes(quant) else {}

    def _step(self, method: str, trial: optuna.Trial) -> Step:
        spec = get_method(method)
        if spec is None or spec.search is None:
            raise ValueError(f"{method!r} is not a searchable method")
        return Step(method=method, params=spec.search.suggest(trial, self))

    def seeds(self) -> list[dict[str, Any]]:
        """acf's own known-good answers, tried first (as Optuna enqueued trials, so the sampler learns from them).

        The fixed recipes a user would otherwise run are not seeds: the yardstick measures them before the search
        (acf.coordinator.yardstick), outside the episode budget. The seeds are what acf adds to them: bits allocated
        per layer at a recipe's size (GPTQ act-order and AutoRound), then the same with kd_tune; for GGUF, per-tensor
        types at Q4_K_M's size; a combination (drop 1 block -> LoRA -> quantize) and SparseGPT 50%."""
        g = self.largest_group()
        seeds = []
        if "gguf" in self.quant_methods:
            uniform = {"gguf_precision": "uniform"} if self.gguf_precisions != ["uniform"] else {}
            budgets = [b for b in self.gguf_precisions if b != "uniform"]
            if budgets:
                # acf's answer to Q4_K_M: per-tensor types at the largest budget no larger than Q4_K_M
                est = q4km_bits_estimate(self._gguf_shapes())
                b = self.budget_params(est, gguf=True)
                if b:
                    seeds.append({"prune": "none", "quant_only": "gguf", **b, "gguf_imatrix": self.gguf_imatrix[0]})
            if "drop_layers" in self.prune_methods and "lora" in self.recover_methods and "Q4_K_M" in self.gguf_types:
                seeds.append({"prune": "drop_layers", "drop": self.drops[0] if self.drops else 1, "recover": "lora",
                              "recover_steps": self.recover_steps[1 if len(self.recover_steps) > 1 else 0],
                              "quant": "gguf", "gguf_type": "Q4_K_M", "gguf_imatrix": self.gguf_imatrix[0], **uniform})
        steps = 100 if 100 in self.tune_steps else self.tune_steps[len(self.tune_steps) // 2]
        kd = {"tune": "kd_tune", "tune_steps": steps} if "kd_tune" in self.tune_methods else None
        for quant, extra in (("gptq", {"act_order": self.act_order[-1]}), ("autoround", {})):
            if quant not in self.quant_methods:
                continue
            # acf's answer to the W4 recipes: bits allocated per layer at no larger a size (4.25 bits = uniform W4
            # at the largest group), then the norms distilled from the uncompressed model (kd_tune)
            budget = self.budget_params(4.25)
            if not budget:   # the default target's smallest allocation is larger (tiny models, vllm): no answer
                continue
            mixed = {"prune": "none", "quant_only": quant, **budget, **extra}
            if kd is not None:
                seeds.append({**mixed, **kd})
            seeds.append({**mixed, **self.untuned(quant)})
        if "drop_layers" in self.prune_methods and "lora" in self.recover_methods and "gptq" in self.quant_methods:
            seeds.append({"prune": "drop_layers", "drop": self.drops[0] if self.drops else 1, "recover": "lora",
                          "recover_steps": self.recover_steps[1 if len(self.recover_steps) > 1 else 0],
                          "quant": "gptq", "precision": "uniform", "bits": 4, "group_size": g,
                          "act_order": self.act_order[-1], **self.untuned("gptq")})
        if "sparsegpt" in self.prune_methods and "unstructured" in self.patterns:
            seeds.append({"prune": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5, "recover": "none",
                          "quant": "none"})
        return [s for s in seeds if self.inside(s)]

    def budget_params(self, bits: float, gguf: bool = False) -> dict[str, Any]:
        """The trial params of the largest budget of this space no larger than `bits` (on the continuous dimension's
        grid, or the largest categorical budget); {} when the space has none that small."""
        name, bname = ("gguf_precision", "gguf_budget") if gguf else ("precision", "budget")
        choices = self.gguf_precisions if gguf else self.precisions
        rng = self.gguf_budget_range if gguf else self.budget_range
        if BUDGET in choices and rng is not None:
            lo, hi, step = rng
            b = min(hi, _grid_down(bits, step))
            return {name: BUDGET, bname: b} if b >= lo - 1e-9 else {}
        fit = [c for c in choices if c not in ("uniform", BUDGET) and float(c) <= bits + 1e-9]
        return {name: max(fit, key=float)} if fit else {}

    def inside(self, params: dict[str, Any]) -> bool:
        """Whether fixed params only use values of this (possibly narrowed) space: seeds and grid entries that
        are not must not be enqueued (Optuna refuses a fixed value outside a categorical's choices)."""
        choices = {"prune": self.prune_methods, "quant_only": self.quant_methods, "quant": self.quant_methods,
                   "recover": self.recover_methods, "recover_steps": self.recover_steps, "bits": self.bits,
                   "group_size": self.group_sizes, "act_order": self.act_order, "pattern": self.patterns,
                   "sparsity": self.sparsities or [0.5], "drop": self.drops or [1], "precision": self.precisions,
                   "gguf_type": self.gguf_types, "gguf_imatrix": self.gguf_imatrix,
                   "gguf_precision": self.gguf_precisions, "tune": self.tune_methods, "tune_steps": self.tune_steps}
        ranges = {"budget": self.budget_range, "gguf_budget": self.gguf_budget_range}
        return all((k not in choices or v in choices[k]) and (k not in ranges or on_grid(v, ranges[k]))
                   for k, v in params.items())

    def largest_group(self) -> str:
        numeric = [x for x in self.group_sizes if x != "channel"]
        return max(numeric, key=int) if numeric else self.group_sizes[0]

    def grid(self) -> list[dict[str, Any]]:
        """The preset grid (sampler=grid): one-method recipes at standard settings (each method's registry
        fragment gives its entries), in a fixed order."""
        out = []
        for m in grid_methods():
            if m.slot == "quant" and m.name in self.quant_methods:
                out += [{"prune": "none", "quant_only": m.name, **d, **self.untuned(m.name)}
                        for d in m.search.grid(self)]  # type: ignore[union-attr]
            elif m.slot == "prune" and m.name in self.prune_methods:
                out += [{"prune": m.name, **d, "recover": "none", "quant": "none"}
                        for d in m.search.grid(self)]  # type: ignore[union-attr]
        return [d for d in out if self.inside(d)]


def _grid_up(bits: float, step: float = BUDGET_STEP) -> float:
    import math

    return round(math.ceil(bits / step - 1e-9) * step, 6)


def _grid_down(bits: float, step: float = BUDGET_STEP) -> float:
    import math

    return round(math.floor(bits / step + 1e-9) * step, 6)


def make_sampler(name: str, seed: int, n_objectives: int) -> optuna.samplers.BaseSampler:
    # Constraints are set per trial with Trial.set_constraint (Optuna >= 5), which both samplers read.
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=4)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=6)
    if name in ("random", "grid"):
        # grid: the preset recipes are enqueued in order; random covers anything asked beyond them.
        return optuna.samplers.RandomSampler(seed=seed)
    raise AcfError(f"unknown sampler {name!r}: choose from {', '.join(SAMPLERS)}")


def open_study(storage: str, study_name: str, objectives: Sequence[str], sampler: str, seed: int,
               meta: dict[str, Any]) -> optuna.Study:
    """Create or join the run's study; a study made for another model/task/objectives is refused."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        st = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                 directions=[DIRECTIONS[o] for o in objectives],
                                 sampler=make_sampler(sampler, seed, len(objectives)))
    except optuna.exceptions.StorageInternalError as e:
        raise AcfError(f"cannot open the study storage {storage}: {e}") from None
    except ValueError as e:  # directions differ from the existing study
        raise AcfError(f"study {study_name!r} in {storage} does not match this run: {e}") from None
    old = st.user_attrs.get("acf_meta")
    if old is None:
        st.set_user_attr("acf_meta", meta)
    else:
        diff = [k for k in ("model", "dataset", "objectives") if old.get(k) != meta.get(k)]
        if diff:
            raise AcfError(f"study {study_name!r} was made for {', '.join(f'{k}={old.get(k)}' for k in diff)}; "
                           f"this run has {', '.join(f'{k}={meta.get(k)}' for k in diff)}: refusing to mix them")
    return st


def enqueue_first(study: optuna.Study, space: SearchSpace, sampler: str) -> None:
    """A new study's first trials: the seed recipes (the preset grid with `--sampler grid`)."""
    for p in space.seeds() if sampler != "grid" else space.grid():
        study.enqueue_trial(p, skip_if_exists=True)


def fail_stale_trials(study: optuna.Study, keep: Optional[int]) -> list[int]:
    """Trials left RUNNING by a killed process (other than the one the graph will redo) are marked failed."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.number != keep:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            out.append(t.number)
    return out


def trial_for(study: optuna.Study, number: int) -> optuna.Trial:
    """Re-attach to a RUNNING trial by number (after a resume) so its suggested params can be re-read."""
    t = study.get_trials(deepcopy=False)[number]
    return optuna.Trial(study, t._trial_id)
