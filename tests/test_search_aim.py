"""The search's new parts (#28): a continuous budget, predictions before spending (a screened proposal is recorded
with its prediction and loads no model), the aim at the largest gap to the recipe frontier, and latency ranked only
where it is measured in the deployment runtime."""

from __future__ import annotations

import math
from types import SimpleNamespace

import optuna
import pytest

from acf.coordinator.state import Candidate, FrontierFile, RunMeta
from acf.core.provenance import Measurement
from acf.methods.strategy import Step, Strategy

MiB = 2 ** 20


def _cand(cid: str, steps: list[tuple[str, dict]], kld: float, size: float, by: str = "optuna:tpe") -> Candidate:
    s = Strategy(steps=[Step(method=m, params=p) for m, p in steps])
    return Candidate(id=cid, episode=0, strategy=s, proposed_by=by,
                     metrics={"kld": Measurement(value=kld, unit="nats/token"),
                              "size": Measurement(value=size, unit="bytes")})


def _ff(recipes: list[Candidate], candidates: list[Candidate], base_size: float = 270 * MiB) -> FrontierFile:
    meta = RunMeta(run_id="r", model="m", model_path="/m", dataset="gsm8k", objectives=["kld", "size"],
                   directions={}, preset="balanced", min_retention=None, sampler="tpe", seed=0, limit=4,
                   proxy_limit=None, episodes=1, device="cpu", acf_version="0", git_commit=None, runtime="t",
                   created_at="", updated_at="")
    base = Candidate(id="baseline", episode=0, strategy=Strategy(steps=[]),
                     metrics={"kld": Measurement(value=0.0), "size": Measurement(value=base_size, unit="bytes")})
    return FrontierFile(run=meta, spec={}, baseline=base, recipes=recipes, candidates=candidates)


def test_the_aim_is_the_largest_gap_to_the_recipe_frontier():
    from acf.search.aim import aims_this_episode, gaps, target

    recipes = [_cand("r:gptq_w3g64_ao", [("gptq", {"bits": 3})], 0.73, 98.6 * MiB),
               _cand("r:autoround_w4g64", [("autoround", {})], 0.042, 111.3 * MiB),
               _cand("r:awq_w4g64", [("awq", {})], 0.155, 112.1 * MiB),        # not on the recipe frontier
               _cand("r:gptq_w8_ao", [("gptq", {"bits": 8})], 0.0025, 159.0 * MiB)]
    acf = [_cand("c001", [("autoround", {"avg_bits": 4.25})], 0.03, 111.1 * MiB),
           _cand("c002", [("gptq", {"avg_bits": 6.0})], 0.01, 150.0 * MiB)]
    ff = _ff(recipes, acf)
    g = {x.recipe_id: x for x in gaps(ff)}
    assert set(g) == {"r:gptq_w3g64_ao", "r:autoround_w4g64", "r:gptq_w8_ao"}
    assert g["r:autoround_w4g64"].ratio == pytest.approx(0.03 / 0.042) and g["r:autoround_w4g64"].acf_id == "c001"
    assert g["r:gptq_w8_ao"].ratio == pytest.approx(0.01 / 0.0025)
    assert math.isinf(g["r:gptq_w3g64_ao"].ratio) and g["r:gptq_w3g64_ao"].acf_id is None
    # nothing at W3's size yet: that is the largest gap
    assert target(ff).recipe_id == "r:gptq_w3g64_ao"
    # once acf beats W3, the largest gap is at W8's size (4x), not W4's (0.71x)
    ff.candidates.append(_cand("c003", [("gptq", {"avg_bits": 3.5})], 0.5, 98.0 * MiB))
    assert target(ff).recipe_id == "r:gptq_w8_ao"
    assert target(ff, exclude=(159.0 * MiB,)).recipe_id == "r:autoround_w4g64"
    # the aimed quantizer is the best recipe's there (one that takes a budget): AWQ and NF4 take none
    from acf.coordinator.screening import aim_quantizer

    space = SimpleNamespace(quant_methods=["gptq", "awq", "bnb_nf4", "autoround"])
    assert aim_quantizer(ff, space, target(ff)) == "gptq"
    assert aim_quantizer(ff, space, g["r:autoround_w4g64"]) == "autoround"
    ff.recipes.append(_cand("r:nf4", [("bnb_nf4", {})], 0.04, 120.0 * MiB))
    nf4 = [x for x in gaps(ff) if x.recipe_id == "r:nf4"][0]
    assert aim_quantizer(ff, space, nf4) == "autoround"                 # acf's best there (c001) took a budget
    assert aim_quantizer(ff, SimpleNamespace(quant_methods=["bnb_nf4"]), nf4) is None
    # seeds first; every third episode after them is left to the sampler
    assert not aims_this_episode(5, seeds_left=True)
    assert [aims_this_episode(e, False) for e in (4, 5, 6, 7)] == [True, True, False, True]


def test_the_budget_is_continuous_and_maps_both_ways(smol_dir):
    from acf.models.spec import infer_spec
    from acf.planner.space import params_for
    from acf.search.space import SearchSpace
    from acf.methods.strategy import validate_strategy

    # the default model: its smallest vLLM-servable allocation (4.03 bits, target vllm) is below 4.25
    space = SearchSpace(infer_spec(smol_dir), prune_methods=["none"], quant_methods=["gptq"],
                        tune_methods=["none"])
    lo, hi, step = space.budget_range
    assert space.precisions == ["uniform", "budget"] and lo < 4.25 and step == 0.125
    # the top reaches the uniform W8 recipe's size (8 bits + scales), no further
    from acf.methods.nominal import format_bits
    assert 8.0 < format_bits("w8", space.spec) <= hi < format_bits("w8", space.spec) + step
    strat = validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": 4.375, "act_order": True}}]},
                              space.spec)
    p = params_for(space, strat)
    assert p is not None and (p["precision"], p["budget"]) == ("budget", 4.375)
    off = validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": 4.3}}]}, space.spec)
    assert params_for(space, off) is None                    # not a value of the dimension: no mapping
    assert space.budget_params(4.3) == {"precision": "budget", "budget": 4.25}   # rounded down: no larger
    assert space.budget_params(lo - 0.2) == {}
    # a benchmark's finite list still works (the categorical space of earlier runs)
    old = SearchSpace(space.spec, prune_methods=["none"], quant_methods=["gptq"], precisions=["uniform", "4.5"])
    assert old.budget_range is None and old.budget_params(4.6) == {"precision": "4.5"}


def _points_ff(spec, base_size: float) -> tuple[FrontierFile, object]:
    """Six measured recipes on the tiny model's shapes, sized by the surrogate's own formula."""
    from acf.search.surrogate import Surrogate, features

    sur = Surrogate(spec, base_size, [])
    rows = [("gptq", {"bits": 3, "group_size": 32}, 0.30), ("gptq", {"bits": 4, "group_size": 32}, 0.10),
            ("gptq", {"bits": 4, "group_size": 64}, 0.12), ("gptq", {"bits": 8, "group_size": None}, 0.003),
            ("rtn", {"bits": 4, "group_size": 32}, 0.2), ("rtn", {"bits": 8, "group_size": None}, 0.005)]
    recipes = []
    for i, (m, p, k) in enumerate(rows):
        s = Strategy(steps=[Step(method=m, params=p)])
        recipes.append(_cand(f"r:{i}", [(m, p)], k, sur.formula_size(features(s, spec))))
    return _ff(recipes, [], base_size), sur


def test_a_screened_proposal_is_recorded_with_its_prediction_and_loads_no_model(tiny_model_dir, monkeypatch):
    from acf.coordinator import screening
    from acf.coordinator.run_store import screened_records
    from acf.evaluation.runner import Loaded
    from acf.models.spec import infer_spec

    def no_load(*a, **k):
        raise AssertionError("a screened proposal must not load a model")

    monkeypatch.setattr(Loaded, "load", staticmethod(no_load))
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    spec = infer_spec(tiny_model_dir)
    ff, _ = _points_ff(spec, base_size=spec.params * 2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    ctx = SimpleNamespace(ff=ff, spec=spec, study=study, say=lambda m: None)
    # 50% magnitude sparsity on top of W4 per channel: predicted far worse than W3 g32, which is no larger
    bad = Strategy(steps=[Step(method="magnitude", params={"sparsity": 0.5}),
                          Step(method="rtn", params={"bits": 4, "group_size": None})])
    trial = study.ask()
    pred, rec = screening.assess(ctx, trial, bad, "optuna:tpe", screenable=True)
    assert rec is not None and pred.kld is not None and pred.kld >= 2 * 0.30 and "estimate" in pred.how
    assert rec.dominated_by == "r:0" and rec.prediction == pred and rec.margin >= screening.SCREEN_MARGIN
    t = study.get_trials(deepcopy=False)[trial.number]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert [s.trial_number for s in screened_records(study)] == [trial.number]
    assert screened_records(study)[0].prediction.kld == pytest.approx(pred.kld)
    # a plausible proposal runs, and keeps its prediction; a seed is never screened
    good = Strategy(steps=[Step(method="gptq", params={"avg_bits": 4.5})])
    pred2, rec2 = screening.assess(ctx, study.ask(), good, "optuna:tpe", screenable=True)
    assert rec2 is None and pred2.kld is not None and pred2.size is not None
    _, rec3 = screening.assess(ctx, study.ask(), bad, "seed recipe", screenable=False)
    assert rec3 is None


def test_predictions_rank_measured_points_and_size_inverts(tiny_model_dir):
    from acf.models.spec import infer_spec
    from acf.search.surrogate import Surrogate, features, spearman

    spec = infer_spec(tiny_model_dir)
    ff, _ = _points_ff(spec, base_size=spec.params * 2)
    sur = Surrogate.from_frontier(ff, spec)
    preds = [sur.predict(c.strategy).kld for c in ff.recipes]
    assert spearman(preds, [c.metrics["kld"].value for c in ff.recipes]) > 0.8
    s = Strategy(steps=[Step(method="gptq", params={"avg_bits": 5.0})])
    size = sur.size(features(s, spec))
    assert sur.bits_for_size(size) == pytest.approx(5.0)
    # dropping a block takes its weights out of the file (a bug once made it larger)
    drop = Strategy(steps=[Step(method="drop_layers", params={"count": 1}),
                           Step(method="gptq", params={"avg_bits": 5.0})])
    assert sur.size(features(drop, spec)) < size
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5) and spearman([1, 2], [2, 1]) is None


def test_latency_is_ranked_only_where_measured_in_the_deployment_runtime():
    from acf.coordinator.run_context import RunConfig, default_objectives
    from acf.coordinator.run_eval import metrics_to_measure

    assert default_objectives("transformers") == ["kld", "size"]
    assert default_objectives("llamacpp") == ["kld", "size", "latency"]
    from acf.coordinator.yardstick import final_metric_names

    cfg = RunConfig(run_dir="/tmp/x", objectives=default_objectives("transformers"))
    ctx = SimpleNamespace(cfg=cfg, task=SimpleNamespace(metrics=("accuracy", "answer_nll")))
    assert "latency" not in metrics_to_measure(ctx) and "latency" not in final_metric_names(ctx)
    # on a GPU it is reported in the held-out report (labelled with its runtime), still not ranked
    ctx.cfg = RunConfig(run_dir="/tmp/x", objectives=default_objectives("transformers"), device="cuda")
    assert "latency" in final_metric_names(ctx) and "latency" not in metrics_to_measure(ctx)
