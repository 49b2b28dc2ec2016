"""How the Optuna search space proposes each method (`SearchFragment`) and the builders the built-in methods use:
pure declarations read by acf.methods.registry (each MethodSpec carries one) and acf.search.space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pydantic import BaseModel

from acf.methods.params import GGUFParams

# ---- the search-space fragment -----------------------------------------------------------------------------------

def _no_grid(space: Any) -> list[dict]:
    return []


@dataclass(frozen=True)
class SearchFragment:
    """How the Optuna search space (acf.search.space.SearchSpace) proposes one method, in its kind's slot.

    suggest(trial, space) -> the step's params, asking the trial for what varies (names are Optuna parameter
    names, shared between methods of a slot: 'group_size' means the same choices for every quantizer).
    trial_params(step_params, space) -> the Optuna params that make `suggest` yield these step params, or None
    when no choice of the space does (the planner replays its proposals through this; the result is checked by
    replaying, so a wrong inverse only loses the mapping, never tells a wrong result).
    grid(space) -> this method's entries of the preset grid (sampler=grid), as Optuna params.
    rank orders the slot's choices (Optuna categoricals keep their order); grid_rank orders the preset grid.
    default: part of the space when a run does not name its methods (gguf is asked for by name).
    budgeted: the method takes a precision budget (`precision`/`budget`), so an aimed episode can fix its size.
    """

    suggest: Callable[[Any, Any], dict]
    trial_params: Callable[[dict, Any], Optional[dict]]
    grid: Callable[[Any], list[dict]] = _no_grid
    rank: int = 100
    grid_rank: Optional[int] = None
    default: bool = True
    budgeted: bool = False


def no_params(calib: bool = False, rank: int = 100, default: bool = True) -> SearchFragment:
    """A method the space proposes with its defaults (plus the run's calibration settings when it calibrates)."""
    return SearchFragment(suggest=lambda trial, space: dict(space.calib) if calib else {},
                          trial_params=lambda params, space: {}, grid=lambda space: [{}], rank=rank, default=default)


def weight_sparsity(calib: bool, rank: int, grid_rank: int) -> SearchFragment:
    """Unstructured sparsity in steps of 0.1 (or the space's list), or the 2:4 pattern (sparsity 0.5)."""

    def suggest(trial, space) -> dict:
        pattern = trial.suggest_categorical("pattern", space.patterns)
        if pattern == "2:4":
            sp = 0.5
        elif space.sparsities:
            sp = trial.suggest_categorical("sparsity", space.sparsities)
        else:
            sp = trial.suggest_float("sparsity", 0.2, 0.6, step=0.1)
        params: dict[str, Any] = {"sparsity": round(sp, 2), "pattern": pattern}
        if calib:
            params.update(space.calib)
        return params

    def trial_params(params: dict, space) -> dict:
        pat = params.get("pattern", "unstructured")
        return {"pattern": pat, "sparsity": params.get("sparsity", 0.5)} if pat == "unstructured" else {"pattern": pat}

    return SearchFragment(suggest, trial_params, lambda space: [{"pattern": "unstructured", "sparsity": 0.5},
                                                                {"pattern": "2:4"}], rank=rank, grid_rank=grid_rank)


def drop_layers_fragment() -> SearchFragment:
    def suggest(trial, space) -> dict:
        n = (int(trial.suggest_categorical("drop", space.drops)) if space.drops
             else trial.suggest_int("drop", 1, space.max_drop))
        return {"count": n, "by": "importance", **space.calib}

    return SearchFragment(suggest, lambda params, space: None if params.get("count") is None else
                          {"drop": params["count"]},
                          lambda space: [{"drop": min(d, space.max_drop)} for d in (1, 2)], rank=3, grid_rank=13)


def recovery(params_model: type[BaseModel], rank: int) -> SearchFragment:
    """A recovery fine-tune (after pruning): the space chooses its number of steps."""
    return SearchFragment(
        suggest=lambda trial, space: {"steps": int(trial.suggest_categorical("recover_steps", space.recover_steps))},
        trial_params=lambda params, space: {"recover_steps": params.get("steps", params_model().steps)},
        rank=rank)


def tune_fragment(rank: int) -> SearchFragment:
    """A step after quantization (kd_tune): the space chooses its number of steps."""
    return SearchFragment(
        suggest=lambda trial, space: {"steps": int(trial.suggest_categorical("tune_steps", space.tune_steps))},
        trial_params=lambda params, space: {"tune_steps": params.get("steps", 100)},
        rank=rank)


def weight_quant(params_model: type[BaseModel], rank: int, *, mixed: bool, calib: bool, act_order: bool = False,
                 fixed_bits: Optional[int] = None, in_grid: bool = True, default: bool = True,
                 grid_bits: Sequence[int] = (4, 8)) -> SearchFragment:
    """Integer weight quantization: uniform (bits, group size) or, for `mixed` methods, an effective-bits budget
    allocated per layer (acf.methods.mixed); optionally act-order (GPTQ). The preset grid has one uniform entry
    per `grid_bits` (or `fixed_bits`) at the largest group."""
    defaults = params_model()

    def suggest(trial, space) -> dict:
        prec = "uniform"
        if mixed and space.precisions != ["uniform"]:
            prec = trial.suggest_categorical("precision", space.precisions)
            if prec == BUDGET:
                lo, hi, step = space.budget_range
                prec = str(trial.suggest_float("budget", lo, hi, step=step))
        if prec == "uniform":
            bits = fixed_bits if fixed_bits is not None else int(trial.suggest_categorical("bits", space.bits))
            g = trial.suggest_categorical("group_size", space.group_sizes)
            params: dict[str, Any] = {"bits": bits, "group_size": None if g == "channel" else int(g)}
        else:
            params = {"avg_bits": float(prec), "sensitivity_seq_len": space.calib["seq_len"],
                      "sensitivity_samples": min(16, space.calib["calib_samples"])}
        if act_order:
            params["act_order"] = bool(trial.suggest_categorical("act_order", space.act_order))
        if calib:
            params.update(space.calib)
        return params

    def trial_params(params: dict, space) -> Optional[dict]:
        p: dict[str, Any] = {}
        avg_bits = params.get("avg_bits")
        if mixed and getattr(space, "precisions", ["uniform"]) != ["uniform"]:
            if avg_bits is None:
                p["precision"] = "uniform"
            else:
                p.update(_budget_params(avg_bits, space.precisions, getattr(space, "budget_range", None),
                                        "precision", "budget"))
        elif avg_bits is not None:
            return None
        if avg_bits is None:
            if fixed_bits is None:
                p["bits"] = params.get("bits", getattr(defaults, "bits"))
            gs = params.get("group_size", getattr(defaults, "group_size"))
            p["group_size"] = "channel" if gs is None else str(gs)
        if act_order:
            p["act_order"] = bool(params.get("act_order", getattr(defaults, "act_order")))
        return p

    def grid(space) -> list[dict]:
        if not in_grid:
            return []
        out = []
        for b in ([fixed_bits] if fixed_bits is not None else list(grid_bits)):
            d: dict[str, Any] = {"group_size": space.largest_group()}
            if fixed_bits is None:
                d["bits"] = b
            if act_order:
                d["act_order"] = False
            if mixed:
                d["precision"] = "uniform"
            out.append(d)
        return out

    return SearchFragment(suggest, trial_params, grid, rank=rank, default=default, budgeted=mixed)


#: the precision choice that asks for a continuous budget (`budget` / `gguf_budget`, in `space.budget_range`)
BUDGET = "budget"


def on_grid(value: float, rng: Optional[tuple[float, float, float]]) -> bool:
    """Whether a budget is a value of the continuous dimension (lo..hi in steps)."""
    if rng is None:
        return False
    lo, hi, step = rng
    k = (float(value) - lo) / step
    return lo - 1e-9 <= float(value) <= hi + 1e-9 and abs(k - round(k)) < 1e-6


def _budget_params(avg_bits: float, choices: list[str], rng: Optional[tuple[float, float, float]], name: str,
                   budget_name: str) -> dict:
    """The trial params of a budget: the continuous dimension's value where the space has one (precision=budget),
    else the categorical choice naming it ("5.0" for 5); {name: None} when the space has no such budget."""
    if BUDGET in choices and on_grid(avg_bits, rng):
        return {name: BUDGET, budget_name: float(avg_bits)}
    for c in choices:
        if c not in ("uniform", BUDGET) and abs(float(c) - float(avg_bits)) < 1e-9:
            return {name: c}
    return {name: None}


def gguf_fragment() -> SearchFragment:
    """A llama.cpp file type, or (where the space has budgets) per-tensor types allocated under a bits budget."""
    def suggest(trial, space) -> dict:
        prec = "uniform"
        if getattr(space, "gguf_precisions", ["uniform"]) != ["uniform"]:
            prec = trial.suggest_categorical("gguf_precision", space.gguf_precisions)
            if prec == BUDGET:
                lo, hi, step = space.gguf_budget_range
                prec = str(trial.suggest_float("gguf_budget", lo, hi, step=step))
        if prec == "uniform":
            params: dict[str, Any] = {"type": trial.suggest_categorical("gguf_type", space.gguf_types)}
        else:
            params = {"type": GGUFParams().type, "avg_bits": float(prec),
                      "sensitivity_seq_len": space.calib["seq_len"],
                      "sensitivity_samples": min(16, space.calib["calib_samples"])}
        params["imatrix"] = bool(trial.suggest_categorical("gguf_imatrix", space.gguf_imatrix))
        if params["imatrix"]:
            params.update(space.calib)
        return params

    def trial_params(params: dict, space) -> Optional[dict]:
        p: dict[str, Any] = {"gguf_imatrix": bool(params.get("imatrix", True))}
        avg = params.get("avg_bits")
        if getattr(space, "gguf_precisions", ["uniform"]) != ["uniform"]:
            if avg is None:
                p["gguf_precision"] = "uniform"
            else:
                p.update(_budget_params(avg, space.gguf_precisions, getattr(space, "gguf_budget_range", None),
                                        "gguf_precision", "gguf_budget"))
        elif avg is not None:
            return None
        if avg is None:
            p["gguf_type"] = params.get("type", GGUFParams().type)
        return p

    return SearchFragment(suggest, trial_params, rank=6, default=False, budgeted=True)
