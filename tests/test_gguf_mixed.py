"""Per-tensor GGUF types under a budget (acf.methods.gguf_mixed): the allocation meets its budget, the file holds the
allocated types and llama.cpp loads it, the token embedding is allocated, a budget the palette cannot reach is refused
before anything runs, and the allocation replays as overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_tiny_model

pytest.importorskip("llama_cpp")

TYPES = ["Q4_0", "Q8_0", "F16"]


def test_allocation_meets_budget_and_spends_where_it_pays():
    from acf.methods.gguf_mixed import TensorShape, allocate_types, min_bits, tensor_bytes

    shapes = [TensorShape(name=f"t{i}", rows=64, cols=256) for i in range(6)]
    # t0 suffers most from quantization: it is the one that should keep the most bits
    scores = {s.name: {"Q4_0": (10.0 if s.name == "t0" else 1.0), "Q8_0": 0.1} for s in shapes}
    assert tensor_bytes("Q4_K", 64, 576) is None and tensor_bytes("Q4_0", 64, 576) == 64 * 18 * 18
    assert min_bits(shapes, TYPES) == pytest.approx(4.5)
    a = allocate_types(shapes, scores, TYPES, 5.5)       # room for one Q8_0 tensor among six
    assert a.effective_bits <= 5.5 and a.tensor_types["t0"] == "Q8_0" and a.counts == {"Q8_0": 1, "Q4_0": 5}
    assert a.predicted_bytes == sum(tensor_bytes(t, 64, 256) for t in a.tensor_types.values())
    assert all(p.startswith("^") and p.endswith("$") for p in a.overrides())
    with pytest.raises(ValueError, match=r"below the smallest size .* \(4\.500 bits"):
        allocate_types(shapes, scores, TYPES, 4.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ggm") / "llama", smol_dir, hidden=64)


@pytest.fixture(scope="module")
def gsm8k(data_root):
    from acf.tasks import get_task

    return get_task("gsm8k", str(data_root / "gsm8k"))


def _run(model_dir: Path, out: Path, task, **params):
    from acf.methods import StepContext, run_strategy
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    p = {"imatrix": False, "sensitivity_samples": 2, "sensitivity_seq_len": 32, **params}
    strat = validate_strategy({"steps": [{"method": "gguf", "params": p}]}, infer_spec(model_dir))
    return run_strategy(strat, model_dir, out, StepContext(task=task))[-1]


def test_mixed_gguf_file_holds_the_allocation_and_llamacpp_loads_it(tiny, gsm8k, tmp_path, monkeypatch):
    from gguf import GGUFReader

    from acf.evaluation.llamacpp import open_llama
    from acf.models.gguf_file import GGUF_NAME, load_manifest

    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    rec = _run(tiny, tmp_path / "mixed", gsm8k, avg_bits=6.0, types=TYPES)
    assert rec.status == "ok", rec.reason
    mp = rec.extra["mixed_precision"]
    alloc = mp["allocation"]
    assert "token_embd.weight" in alloc["tensor_types"]            # the (tied) embedding is allocated too
    assert alloc["effective_bits"] <= 6.0 and len(set(alloc["tensor_types"].values())) >= 2
    f = tmp_path / "mixed" / GGUF_NAME
    got = {t.name: t.tensor_type.name for t in GGUFReader(str(f)).tensors}
    assert {n: got[n] for n in alloc["tensor_types"]} == alloc["tensor_types"]
    assert mp["measured_file_bytes"] == f.stat().st_size
    assert abs(mp["size_prediction_error"]) < 0.01                  # the budget holds on disk within 1%
    assert not mp["sensitivity"]["cache_hit"]
    llm = open_llama(f, 256, logits_all=False)
    try:
        llm.eval([1, 2, 3])
    finally:
        llm.close()
    # the allocation replays as plain overrides, and a second allocation reads the cached sensitivity
    man = load_manifest(tmp_path / "mixed")
    rep = _run(tiny, tmp_path / "replay", gsm8k, type="Q8_0", overrides=man.overrides)
    assert rep.status == "ok", rep.reason
    got2 = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "replay" / GGUF_NAME)).tensors}
    assert {n: got2[n] for n in alloc["tensor_types"]} == alloc["tensor_types"]
    again = _run(tiny, tmp_path / "again", gsm8k, avg_bits=5.0, types=TYPES)
    assert again.status == "ok" and again.extra["mixed_precision"]["sensitivity"]["cache_hit"]


def test_unreachable_budget_refused_before_running(tiny):
    from acf.core.errors import StrategyError
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    spec = infer_spec(tiny)
    with pytest.raises(StrategyError, match=r"avg_bits 4 is below the smallest size"):
        validate_strategy({"steps": [{"method": "gguf", "params": {"avg_bits": 4.0, "types": TYPES}}]}, spec)
    with pytest.raises(StrategyError, match=r"not both"):
        validate_strategy({"steps": [{"method": "gguf", "params": {"avg_bits": 6.0, "overrides": {"x": "Q8_0"}}}]},
                          spec)
    with pytest.raises(StrategyError, match=r"unknown tensor type"):
        validate_strategy({"steps": [{"method": "gguf", "params": {"avg_bits": 6.0, "types": ["Q4_Z"]}}]}, spec)


def test_search_offers_gguf_budgets_the_model_can_reach(smol_dir):
    import optuna

    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    spec = infer_spec(smol_dir)
    space = SearchSpace(spec, quant_methods=["gguf"], prune_methods=["none"])
    # uniform file types, or a continuous budget from the smallest size the palette reaches
    lo, hi, step = space.gguf_budget_range
    assert space.gguf_precisions == ["uniform", "budget"] and lo <= 4.5 and hi >= 6.5 and step == 0.125
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seeds = space.seeds()
    for p in seeds:
        study.enqueue_trial(p)
    mixed_seeds = []
    for p in seeds:                  # llama.cpp's own recipes are seeded uniform, never left to the sampler
        t = study.ask()
        s = space.suggest(t)
        if "gguf_type" in p:
            assert t.params.get("gguf_precision") == "uniform" and s.steps[-1].params.get("avg_bits") is None
        else:
            mixed_seeds.append(s.steps[-1].params["avg_bits"])
        study.tell(t, 0.0)
    # and acf's answer at no more than Q4_K_M's size (estimated low: SmolLM2's Q4_K_M measures 6.3 bits), on the
    # budget grid
    assert mixed_seeds == [5.875]
    seen, budgets = set(), set()
    for _ in range(12):
        t = study.ask()
        s = space.suggest(t)
        validate_strategy(s.model_dump(), spec)
        seen.add(t.params.get("gguf_precision"))
        budgets.add(t.params.get("gguf_budget"))
        study.tell(t, 0.0)
    assert seen == {"uniform", "budget"} and len(budgets - {None}) >= 3
    assert all(lo <= b <= hi and (b / step).is_integer() for b in budgets - {None})
