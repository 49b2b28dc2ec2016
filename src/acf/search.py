"""The Optuna side of the search: a conditional space built from the model spec, samplers, seeds, ask/tell.

One study per run (SQLite in the run dir by default; any Optuna storage URL works), so a killed run resumes
with the sampler's full history, and several processes could share one study.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import optuna

from .errors import AcfError
from .objectives import DIRECTIONS
from .spec import ModelSpec
from .strategy import Strategy, Step

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random", "grid")
DEFAULT_SAMPLER = "tpe"

PRUNE_CHOICES = ["none", "magnitude", "wanda", "sparsegpt", "drop_layers"]
QUANT_CHOICES = ["none", "gptq", "awq", "rtn", "w8a8", "bnb_nf4", "bnb_int8"]
RECOVER_CHOICES = ["none", "lora", "distill"]
#: "uniform" (one bits/group_size for every layer) or an effective-bits budget for a per-layer allocation
#: (acf.methods.mixed); one candidate per budget, so the search explores budgets, not layers
PRECISION_CHOICES = ["uniform", "4.25", "4.5", "5.0", "6.0"]
MIXED_METHODS = ("gptq", "rtn")
#: every quantization method a run may name; "gguf" is searched when asked for (--quant-methods gguf,...) and is the
#: only one with --runtime llamacpp (a GGUF is what that runtime runs)
ALL_QUANT_CHOICES = QUANT_CHOICES + ["gguf"]
#: GGUF types the search picks from (those the model's shapes admit: acf.gguf.type_problems)
GGUF_TYPE_CHOICES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M")


class SearchSpace:
    """The conditional space. Every strategy it yields passes `validate_strategy` for this spec."""

    def __init__(self, spec: ModelSpec, device: str = "cpu", calib_samples: int = 64, seq_len: int = 512,
                 recover_steps: Sequence[int] = (25, 50, 100), quant_methods: Sequence[str] = QUANT_CHOICES,
                 prune_methods: Sequence[str] = PRUNE_CHOICES, *, recover_methods: Sequence[str] = RECOVER_CHOICES,
                 bits: Sequence[int] = (4, 8), group_sizes: Optional[Sequence[str]] = None,
                 sparsities: Optional[Sequence[float]] = None, patterns: Sequence[str] = ("unstructured", "2:4"),
                 drops: Optional[Sequence[int]] = None, act_order: Sequence[bool] = (False, True),
                 precisions: Sequence[str] = PRECISION_CHOICES,
                 gguf_types: Optional[Sequence[str]] = None, gguf_imatrix: Sequence[bool] = (True, False)):
        """Defaults are acf's full space; the keyword arguments narrow it (benchmarks replay a finite space)."""
        self.spec = spec
        self.device = device
        self.calib = {"calib_samples": calib_samples, "seq_len": seq_len}
        self.recover_steps = list(recover_steps)
        gs = [g for g in spec.valid_group_sizes if g >= 32] or spec.valid_group_sizes
        self.group_sizes = list(group_sizes) if group_sizes else [str(g) for g in sorted(gs)[-2:]] + ["channel"]
        self.max_drop = max(1, spec.num_layers // 4)
        self.quant_methods = list(quant_methods)
        self.prune_methods = list(prune_methods)
        if not [q for q in self.quant_methods if q != "none"]:
            # without a quantization method, "no pruning" would be the baseline itself: not a candidate
            self.prune_methods = [p for p in self.prune_methods if p != "none"]
        if not self.prune_methods:
            raise ValueError("the search space is empty: choose at least one quantization or pruning method")
        self.recover_methods = list(recover_methods)
        self.bits = list(bits)
        self.sparsities = list(sparsities) if sparsities else None
        self.patterns = list(patterns)
        self.drops = list(drops) if drops else None
        self.act_order = list(act_order)
        self.precisions = [str(p) for p in precisions] or ["uniform"]
        from .gguf import type_problems

        widths = spec.linear_widths(("lm_head",))
        self.gguf_types = [t for t in (gguf_types or GGUF_TYPE_CHOICES) if not type_problems(t, widths, {})]
        if "gguf" in self.quant_methods and not self.gguf_types:
            raise ValueError("gguf: none of the GGUF types fits this model's layer widths")
        self.gguf_imatrix = list(gguf_imatrix)

    def suggest(self, trial: optuna.Trial) -> Strategy:
        steps: list[Step] = []
        prune = trial.suggest_categorical("prune", self.prune_methods)
        if prune in ("magnitude", "wanda", "sparsegpt"):
            pattern = trial.suggest_categorical("pattern", self.patterns)
            if pattern == "2:4":
                sp = 0.5
            elif self.sparsities:
                sp = trial.suggest_categorical("sparsity", self.sparsities)
            else:
                sp = trial.suggest_float("sparsity", 0.2, 0.6, step=0.1)
            params: dict[str, Any] = {"sparsity": round(sp, 2), "pattern": pattern}
            if prune != "magnitude":
                params.update(self.calib)
            steps.append(Step(method=prune, params=params))
        elif prune == "drop_layers":
            n = (int(trial.suggest_categorical("drop", self.drops)) if self.drops
                 else trial.suggest_int("drop", 1, self.max_drop))
            steps.append(Step(method="drop_layers", params={"count": n, "by": "importance", **self.calib}))
        if prune != "none":
            rec = trial.suggest_categorical("recover", self.recover_methods)
            if rec != "none":
                st = trial.suggest_categorical("recover_steps", self.recover_steps)
                steps.append(Step(method=rec, params={"steps": int(st)}))
            quant = trial.suggest_categorical("quant", self.quant_methods)
        else:
            quant = trial.suggest_categorical("quant_only", [q for q in self.quant_methods if q != "none"])
        if quant in ("gptq", "rtn", "awq"):
            prec = "uniform"
            if quant in MIXED_METHODS and self.precisions != ["uniform"]:
                prec = trial.suggest_categorical("precision", self.precisions)
            if prec == "uniform":
                bits = 4 if quant == "awq" else int(trial.suggest_categorical("bits", self.bits))
                g = trial.suggest_categorical("group_size", self.group_sizes)
                params = {"bits": bits, "group_size": None if g == "channel" else int(g)}
            else:
                params = {"avg_bits": float(prec), "sensitivity_seq_len": self.calib["seq_len"],
                          "sensitivity_samples": min(16, self.calib["calib_samples"])}
            if quant == "gptq":
                params["act_order"] = bool(trial.suggest_categorical("act_order", self.act_order))
            if quant != "rtn":
                params.update(self.calib)
            steps.append(Step(method=quant, params=params))
        elif quant == "w8a8":
            steps.append(Step(method="w8a8", params=dict(self.calib)))
        elif quant in ("bnb_nf4", "bnb_int8"):
            steps.append(Step(method=quant, params={}))
        elif quant == "gguf":
            params = {"type": trial.suggest_categorical("gguf_type", self.gguf_types)}
            params["imatrix"] = bool(trial.suggest_categorical("gguf_imatrix", self.gguf_imatrix))
            if params["imatrix"]:
                params.update(self.calib)
            steps.append(Step(method="gguf", params=params))
        return Strategy(steps=steps)

    def seeds(self) -> list[dict[str, Any]]:
        """Known-good recipes tried first (as Optuna enqueued trials, so the sampler learns from them).

        The fixed recipes a user would otherwise run come first, so every run measures what acf must beat: GPTQ W4
        at the largest valid group, plain and with act-order (llm-compressor's recommended setting); then W8A8,
        a combination (drop 1 block -> LoRA -> GPTQ W4 act-order) and SparseGPT 50%."""
        g = self._largest_group()
        seeds = []
        if "gguf" in self.quant_methods:
            # what llama.cpp users deploy: Q4_K_M with an importance matrix, and Q8_0
            for t in ("Q4_K_M", "Q8_0"):
                if t in self.gguf_types:
                    seeds.append({"prune": "none", "quant_only": "gguf", "gguf_type": t,
                                  "gguf_imatrix": self.gguf_imatrix[0]})
            if "drop_layers" in self.prune_methods and "lora" in self.recover_methods and "Q4_K_M" in self.gguf_types:
                seeds.append({"prune": "drop_layers", "drop": self.drops[0] if self.drops else 1, "recover": "lora",
                              "recover_steps": self.recover_steps[1 if len(self.recover_steps) > 1 else 0],
                              "quant": "gguf", "gguf_type": "Q4_K_M", "gguf_imatrix": self.gguf_imatrix[0]})
        if "gptq" in self.quant_methods:
            seeds.append({"prune": "none", "quant_only": "gptq", "precision": "uniform", "bits": 4, "group_size": g,
                          "act_order": False})
            if True in self.act_order:
                seeds.append({"prune": "none", "quant_only": "gptq", "precision": "uniform", "bits": 4, "group_size": g,
                              "act_order": True})
            # acf's own answer to the fixed recipe: the same GPTQ, bits allocated per layer at no larger a size
            seeds.append({"prune": "none", "quant_only": "gptq", "precision": "4.25", "act_order": self.act_order[-1]})
        if "w8a8" in self.quant_methods:
            seeds.append({"prune": "none", "quant_only": "w8a8"})
        if "drop_layers" in self.prune_methods and "lora" in self.recover_methods and "gptq" in self.quant_methods:
            seeds.append({"prune": "drop_layers", "drop": self.drops[0] if self.drops else 1, "recover": "lora",
                          "recover_steps": self.recover_steps[1 if len(self.recover_steps) > 1 else 0],
                          "quant": "gptq", "precision": "uniform", "bits": 4, "group_size": g,
                          "act_order": self.act_order[-1]})
        if "sparsegpt" in self.prune_methods and "unstructured" in self.patterns:
            seeds.append({"prune": "sparsegpt", "pattern": "unstructured", "sparsity": 0.5, "recover": "none",
                          "quant": "none"})
        return [s for s in seeds if self.inside(s)]

    def inside(self, params: dict[str, Any]) -> bool:
        """Whether fixed params only use values of this (possibly narrowed) space: seeds and grid entries that
        are not must not be enqueued (Optuna refuses a fixed value outside a categorical's choices)."""
        choices = {"prune": self.prune_methods, "quant_only": self.quant_methods, "quant": self.quant_methods,
                   "recover": self.recover_methods, "recover_steps": self.recover_steps, "bits": self.bits,
                   "group_size": self.group_sizes, "act_order": self.act_order, "pattern": self.patterns,
                   "sparsity": self.sparsities or [0.5], "drop": self.drops or [1], "precision": self.precisions,
                   "gguf_type": self.gguf_types, "gguf_imatrix": self.gguf_imatrix}
        return all(k not in choices or v in choices[k] for k, v in params.items())

    def _largest_group(self) -> str:
        numeric = [x for x in self.group_sizes if x != "channel"]
        return max(numeric, key=int) if numeric else self.group_sizes[0]

    def grid(self) -> list[dict[str, Any]]:
        """The preset grid (sampler=grid): one-method recipes at standard settings, in a fixed order."""
        g = self._largest_group()
        out = []
        for q in ("gptq", "awq", "rtn"):
            if q in self.quant_methods:
                for b in ([4] if q == "awq" else [4, 8]):
                    d = {"prune": "none", "quant_only": q, "group_size": g}
                    if q != "awq":
                        d["bits"] = b
                    if q == "gptq":
                        d["act_order"] = False
                    if q in MIXED_METHODS:
                        d["precision"] = "uniform"
                    out.append(d)
        for q in ("w8a8", "bnb_nf4", "bnb_int8"):
            if q in self.quant_methods:
                out.append({"prune": "none", "quant_only": q})
        for p in ("sparsegpt", "wanda", "magnitude"):
            if p in self.prune_methods:
                out.append({"prune": p, "pattern": "unstructured", "sparsity": 0.5, "recover": "none", "quant": "none"})
                out.append({"prune": p, "pattern": "2:4", "recover": "none", "quant": "none"})
        if "drop_layers" in self.prune_methods:
            for d in (1, 2):
                out.append({"prune": "drop_layers", "drop": min(d, self.max_drop), "recover": "none", "quant": "none"})
        return [d for d in out if self.inside(d)]


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
