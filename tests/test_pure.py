"""Pareto, hypervolume, reward and objectives on hand-made points with known answers (no model needed)."""

import math

import pytest

from acf.core.errors import AcfError
from acf.core.objectives import parse_objectives
from acf.search.pareto import crowding_distance, dominates, frontier_stalled, hypervolume, pareto_front, reference_point
from acf.search.reward import recommend, reward, weights_for

OBJ = ["answer_nll", "size"]


def test_dominance_respects_directions():
    assert dominates({"answer_nll": 1.0, "size": 5}, {"answer_nll": 1.2, "size": 5}, OBJ)
    assert not dominates({"answer_nll": 1.0, "size": 5}, {"answer_nll": 1.0, "size": 5}, OBJ)
    # accuracy is maximised
    assert dominates({"accuracy": 0.6, "size": 5}, {"accuracy": 0.5, "size": 5}, ["accuracy", "size"])
    assert not dominates({"accuracy": 0.5, "size": 5}, {"accuracy": 0.6, "size": 5}, ["accuracy", "size"])


def test_front_excludes_dominated_duplicates_and_missing():
    pts = {"a": {"answer_nll": 1.0, "size": 10}, "b": {"answer_nll": 2.0, "size": 5},
           "c": {"answer_nll": 2.0, "size": 10}, "d": {"answer_nll": 1.0, "size": 10},
           "e": {"answer_nll": float("nan"), "size": 1}, "f": {"size": 1}}
    assert pareto_front(pts, OBJ) == ["a", "b"]


def test_hypervolume_known_value():
    pts = [{"answer_nll": 1.0, "size": 10}, {"answer_nll": 2.0, "size": 5}]
    ref = {"answer_nll": 3.0, "size": 20}
    assert hypervolume(pts, OBJ, ref) == pytest.approx(25.0)
    # a point outside the reference box adds nothing
    assert hypervolume(pts + [{"answer_nll": 4.0, "size": 1}], OBJ, ref) == pytest.approx(25.0)
    # normalisation divides each axis
    assert hypervolume(pts, OBJ, ref, normalise={"answer_nll": 1.0, "size": 10.0}) == pytest.approx(2.5)
    # maximised axis: accuracy 0.5 vs ref 0.3 -> width 0.2, size 10 vs ref 20 -> 10
    assert hypervolume([{"accuracy": 0.5, "size": 10}], ["accuracy", "size"], {"accuracy": 0.3, "size": 20}) == \
        pytest.approx(2.0)


def test_reference_point_is_worse_than_baseline():
    ref = reference_point({"accuracy": 0.5, "answer_nll": 1.0, "size": 100}, ["accuracy", "answer_nll", "size"])
    assert ref == pytest.approx({"accuracy": 0.45, "answer_nll": 1.1, "size": 110})


def test_crowding_distance_boundaries_infinite():
    d = crowding_distance({"a": {"x": 0, "y": 2}, "b": {"x": 1, "y": 1}, "c": {"x": 2, "y": 0}}, ["x", "y"])
    assert math.isinf(d["a"]) and math.isinf(d["c"]) and d["b"] == pytest.approx(2.0)


def test_reward_terms_and_penalty():
    base = {"answer_nll": 1.4, "size": 100.0}
    same = reward(base, base, OBJ, "balanced")
    assert same.reward == pytest.approx(0.5) and same.feasible  # retention 1 * 0.5 + saving 0 * 0.5
    half = reward({"answer_nll": 1.4, "size": 50.0}, base, OBJ, "balanced")
    assert half.reward == pytest.approx(0.75)
    worse = reward({"answer_nll": 1.5, "size": 40.0}, base, OBJ, "balanced", min_retention=0.95)
    assert not worse.feasible
    assert worse.retention == pytest.approx(math.exp(-0.1))
    assert worse.penalty == pytest.approx(10 * (0.95 - math.exp(-0.1)))


def test_presets_weight_what_they_say():
    w = weights_for(["answer_nll", "size", "latency"], "latency_focused")
    assert w["latency"] > w["size"] and sum(w.values()) == pytest.approx(1.0)
    w = weights_for(["answer_nll", "size", "latency"], "memory_constrained")
    assert w["size"] > w["latency"]
    with pytest.raises(AcfError):
        weights_for(OBJ, "nope")


def test_recommend_prefers_feasible():
    base = {"answer_nll": 1.0, "size": 100.0}
    cands = {"small_bad": {"answer_nll": 1.5, "size": 10.0}, "ok": {"answer_nll": 1.02, "size": 50.0}}
    cid, r = recommend(cands, list(cands), base, OBJ, "memory_constrained", 0.95)
    assert cid == "ok" and r.feasible


def test_objectives_parsing():
    assert parse_objectives("answer_nll,size") == ["answer_nll", "size"]
    for bad in ("answer_nll", "size,latency", "answer_nll,foo"):
        with pytest.raises(AcfError):
            parse_objectives(bad)
    with pytest.raises(AcfError):
        parse_objectives("mc1,size", task_metrics=("accuracy", "answer_nll"))


def test_seeds_and_grid_stay_inside_a_narrowed_space(tiny_model_dir):
    """Optuna refuses an enqueued value outside a categorical's choices: narrowed spaces drop such recipes."""
    import optuna

    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec

    spec = infer_spec(tiny_model_dir)
    space = SearchSpace(spec, "cpu", 4, 64, [2], quant_methods=["none", "gptq", "rtn"],
                        prune_methods=["none", "wanda", "drop_layers"], recover_methods=["none", "lora"], bits=[4],
                        sparsities=[0.5], patterns=["unstructured"], drops=[2], act_order=[False])
    entries = space.grid() + space.seeds()
    assert entries and all(space.inside(e) for e in entries)
    assert not any(e.get("bits") == 8 for e in entries)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for e in entries:
        study.enqueue_trial(e)
    for _ in entries:
        space.suggest(study.ask())          # would raise "'8' not in (4,)" before


def test_cli_method_narrowing_is_validated_before_anything_runs(tmp_path):
    from acf.core.errors import AcfError
    from acf.coordinator.run_context import RunConfig, validate_config

    def cfg(**kw):
        return RunConfig(model="m", dataset="gsm8k", run_dir=str(tmp_path / "r"), objectives=["answer_nll", "size"],
                         **kw)

    with pytest.raises(AcfError, match="unknown method.*gptqq"):
        validate_config(cfg(quant_methods=["gptqq"]), ("accuracy", "answer_nll"))
    with pytest.raises(AcfError, match="nothing to search"):
        validate_config(cfg(quant_methods=["none"], prune_methods=["none"]), ("accuracy", "answer_nll"))
    with pytest.raises(AcfError, match="recover-steps"):
        validate_config(cfg(recover_steps=[]), ("accuracy", "answer_nll"))
    with pytest.raises(AcfError, match="recover-steps"):
        validate_config(cfg(recover_steps=[25, 0]), ("accuracy", "answer_nll"))
    ok = validate_config(cfg(quant_methods=["none", "rtn"], prune_methods=["none", "drop_layers"]),
                         ("accuracy", "answer_nll"))
    assert ok.quant_methods == ["none", "rtn"]
    assert not (tmp_path / "r").exists()


def test_space_without_quantization_never_proposes_the_baseline(tiny_model_dir):
    import optuna

    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec

    space = SearchSpace(infer_spec(tiny_model_dir), "cpu", 4, 64, [2], quant_methods=["none"],
                        prune_methods=["none", "magnitude"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        assert space.suggest(study.ask()).steps


def test_patience_counts_frontier_members_not_hypervolume():
    """A candidate outside the hypervolume's reference box still changes the frontier: patience must not stop."""
    base = {"kld": 0.0, "size": 100.0, "latency": 10.0}
    objs = ["kld", "size", "latency"]
    pts = {"base": base,
           "c1": {"kld": 0.30, "size": 40.0, "latency": 12.0},     # slower than the baseline's +10%: no volume
           "c2": {"kld": 0.15, "size": 40.0, "latency": 12.0},     # better kld, same cost: joins, pushes c1 off
           "c3": {"kld": 0.40, "size": 41.0, "latency": 12.0}}     # dominated
    ref = reference_point(base, objs, fixed={"kld": 0.5})
    front = pareto_front(pts, objs)
    assert set(front) == {"base", "c2"}
    assert hypervolume([pts[k] for k in front], objs, ref, normalise=base) == \
        hypervolume([base], objs, ref, normalise=base)                         # the volume did not move
    order = ["c1", "c2", "c3"]
    assert not frontier_stalled(order, front, 2)        # c2, two episodes back, joined
    assert frontier_stalled(order + ["c4"], front, 2)   # c3 and c4 did not
    assert not frontier_stalled(order, front, 3) and not frontier_stalled(order[:1], front, 1)   # too few yet
    assert not frontier_stalled([], front, 1) and not frontier_stalled(order, front, 0)
