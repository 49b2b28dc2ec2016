"""Mapping a proposed strategy onto the run: the Optuna parameters that yield it, and the run's calibration defaults."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import optuna

from acf.core.errors import StrategyError
from acf.methods.registry import SLOTS, get as get_method
from acf.search.space import SearchSpace
from acf.methods.strategy import METHODS, Step, Strategy, validate_strategy


def params_for(space: SearchSpace, strategy: Strategy) -> Optional[dict[str, Any]]:
    """The SearchSpace parameters whose `suggest` yields exactly `strategy` (validated), or None if none do.

    Each step's part comes from its method's registry fragment (`SearchFragment.trial_params`); the check is by
    construction: the params are replayed through `space.suggest(FixedTrial(params))` and the result must equal
    the strategy after default-filling, so Optuna is never told a result for a strategy other than the one that ran.
    """
    slots: dict[str, Step] = {}
    for st in strategy.steps:   # at most one step per slot, in the space's order prune -> recover -> quant -> tune
        spec = get_method(st.method)
        if spec is None or spec.search is None or spec.slot in slots or any(
                SLOTS.index(s) > SLOTS.index(spec.slot) for s in slots):
            return None
        slots[spec.slot] = st
    prune, rec, q, tune = slots.get("prune"), slots.get("recover"), slots.get("quant"), slots.get("tune")
    if rec is not None and prune is None:
        return None
    p: dict[str, Any] = {"prune": prune.method if prune is not None else "none"}
    if prune is not None:
        if prune.method not in space.prune_methods:
            return None
        p["recover"] = rec.method if rec is not None else "none"
        if rec is not None and rec.method not in space.recover_methods:
            return None
    qname = q.method if q is not None else "none"
    if qname not in space.quant_methods or (prune is None and qname == "none"):
        return None
    p["quant" if prune is not None else "quant_only"] = qname
    if space.tunes(qname):
        p["tune"] = tune.method if tune is not None else "none"
        if p["tune"] not in space.tune_methods:
            return None
    elif tune is not None:
        return None
    for st in (prune, rec, q, tune):
        if st is not None:
            part = get_method(st.method).search.trial_params(st.params, space)  # type: ignore[union-attr]
            if part is None:
                return None
            p.update(part)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # FixedTrial only warns about a value outside the choices
            replay = space.suggest(optuna.trial.FixedTrial(p))
        replay = validate_strategy(replay, space.spec, space.device)
        want = validate_strategy(strategy, space.spec, space.device)
    except (ValueError, TypeError, StrategyError, UserWarning):
        return None
    return p if replay.key() == want.key() else None


def with_run_defaults(strategy: dict, cfg) -> dict:
    """Calibration settings the planner left out take the run's --calib-samples/--seq-len, not the method defaults.

    The run's calibration budget is the user's choice (Optuna's proposals use it too); a planner that omits it
    should not silently quadruple an episode's cost, and matching settings let the proposal map onto Optuna.
    """
    steps = []
    for st in strategy.get("steps") or []:
        st = dict(st)
        info = METHODS.get(st.get("method"))
        params = dict(st.get("params") or {})
        if info is not None and info.kind in ("quantize", "prune"):
            fields = info.params.model_fields
            for k, v in (("calib_samples", cfg.calib_samples), ("seq_len", cfg.seq_len)):
                if k in fields and k not in params:
                    params[k] = v
        st["params"] = params
        steps.append(st)
    return {**strategy, "steps": steps}
