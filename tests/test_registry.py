"""The method registry (acf.methods.registry) is the one place a method is declared: a toy method registered there
alone is validated, searched, mapped back by the planner, costed, listed by `acf methods`, offered by its agent card
and run as a real step; and the card files on disk are the registry's generated copy."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import pytest

from acf.methods.params import MethodParams

ROOT = Path(__file__).resolve().parents[1]


class CastParams(MethodParams):
    dtype: Literal["float16", "bfloat16"] = "float16"


def cast_dtype(params: dict, in_dir: Path, out_dir: Path, ctx) -> dict:
    """The toy method: the model's weights cast to 16-bit floats, really written (half the bytes of fp32)."""
    import torch

    from acf.methods.model_io import load_dense, save_model

    model, tok = load_dense(in_dir, ctx.device, "cast16", trust_remote_code=ctx.trust_remote_code)
    save_model(model, tok, out_dir, dtype=getattr(torch, params["dtype"]))
    return {"cast_to": params["dtype"]}


@pytest.fixture
def toy_method():
    from acf.methods.registry import MethodSpec, data_free, no_params, register, unregister

    spec = register(MethodSpec(
        name="cast16", kind="quantize", params=CastParams, impl="test_registry:cast_dtype",
        description="cast every weight to a 16-bit float", library="torch", cost=data_free(),
        search=no_params(rank=50, default=False), card="quantization", card_ranges={"dtype": ["float16", "bfloat16"]}))
    try:
        yield spec
    finally:
        unregister("cast16")


def test_a_method_registered_alone_is_seen_everywhere(toy_method, tiny_model_dir, tmp_path):
    import optuna
    from typer.testing import CliRunner

    from acf.cli.main import app
    from acf.methods import StepContext, run_strategy
    from acf.coordinator.run_context import RunConfig, validate_config
    from acf.planner import params_for
    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy
    from acf.coordinator.subagents import estimate_cost_tool, load_cards, render_methods_block

    spec = infer_spec(tiny_model_dir)
    # validation: defaults filled, bad values and misplaced steps refused like any method's
    strat = validate_strategy({"steps": [{"method": "cast16"}]}, spec)
    assert strat.steps[0].params == {"dtype": "float16"}
    with pytest.raises(Exception, match="dtype"):
        validate_strategy({"steps": [{"method": "cast16", "params": {"dtype": "int3"}}]}, spec)
    with pytest.raises(Exception, match="only one quantization step"):
        validate_strategy({"steps": [{"method": "cast16"}, {"method": "rtn"}]}, spec)
    # the search space: asked for by name (not in the default space), proposed, and mapped back for the planner
    cfg = validate_config(RunConfig(model="m", run_dir=str(tmp_path / "r"), objectives=["answer_nll", "size"],
                                    quant_methods=["none", "cast16"], prune_methods=["none"]),
                          ("accuracy", "answer_nll"))
    assert "cast16" not in SearchSpace(spec).quant_methods
    space = SearchSpace(spec, quant_methods=cfg.quant_methods, prune_methods=cfg.prune_methods)
    study = optuna.create_study()
    proposed = space.suggest(study.ask())
    assert [s.method for s in proposed.steps] == ["cast16"]
    assert params_for(space, strat) == {"prune": "none", "quant_only": "cast16"}
    assert {"prune": "none", "quant_only": "cast16"} in space.grid()
    # the cost model
    est = estimate_cost_tool('[{"method": "cast16"}]', str(tiny_model_dir))
    assert est["ok"] and est["steps"][0]["method"] == "cast16" and est["steps"][0]["estimated_seconds"] > 0
    # `acf methods`
    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0 and "cast16" in res.output
    # the agent card that offers it
    assert load_cards()["quantization"].search_space["methods"]["cast16"] == {"dtype": ["float16", "bfloat16"]}
    assert "cast16: {dtype: [float16, bfloat16]}" in render_methods_block("quantization")
    # and it runs as a real step through its declared implementation
    recs = run_strategy(strat, tiny_model_dir, tmp_path / "out", StepContext())
    assert recs[-1].status == "ok", recs[-1].reason
    assert recs[-1].extra["cast_to"] == "float16"
    st = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    src = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert st < 0.6 * src      # fp32 -> fp16 halves the weights


def test_card_files_are_the_registrys_generated_copy(tmp_path):
    """agents/*.md list exactly the registry's methods and ranges (regenerate with `python -m acf.coordinator.subagents`)."""
    from acf.methods.registry import all_methods
    from acf.coordinator.subagents import load_cards, sync_cards

    copy = tmp_path / "agents"
    shutil.copytree(ROOT / "agents", copy)
    assert sync_cards(copy) == [], "agents/*.md differ from the registry: run `python -m acf.coordinator.subagents`"
    offered = {m for c in load_cards(copy).values() for m in (c.search_space.get("methods") or {})}
    assert offered == set(all_methods())


def test_every_searchable_method_round_trips_through_its_fragment(tiny_model_dir):
    """Each registered fragment's inverse (trial_params) replays its own proposals, for every method the space
    can hold (autoround and gguf included, which the default space leaves out)."""
    import optuna

    from acf.methods.registry import choices
    from acf.planner import params_for
    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    spec = infer_spec(tiny_model_dir)
    space = SearchSpace(spec, "cpu", 4, 64, [2], quant_methods=choices("quant", everything=True),
                        prune_methods=choices("prune", everything=True))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(80):
        s = validate_strategy(space.suggest(study.ask()), spec)
        seen |= {st.method for st in s.steps}
        assert params_for(space, s) is not None, s.describe()
    assert {"autoround", "gguf", "drop_layers", "lora"} <= seen
