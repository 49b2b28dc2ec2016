"""Per-layer mixed precision: pure allocation and sizes, validation, and real mixed GPTQ/RTN models on a tiny Llama
that reload with plain transformers in the allocated formats, at the predicted size."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from acf.core.errors import StrategyError
from acf.methods.base import StepContext
from acf.methods.mixed import (KEEP, LayerShape, allocate, default_formats, direct_sensitivity, effective_bits,
                               fisher_sensitivity, layer_bytes, min_effective_bits, parse_format)
from acf.methods.sensitivity_cache import cached_sensitivity
from acf.models.spec import infer_spec
from acf.methods.strategy import validate_strategy
from acf.tasks import get_task

# --- pure ---------------------------------------------------------------------------------------------------------

SHAPES = [LayerShape(name=f"l{i}", out_features=o, in_features=w)
          for i, (o, w) in enumerate([(64, 64), (128, 64), (64, 128), (32, 64), (64, 64)])]
FORMATS = ["w3g32", "w4g32", "w4", "w8", KEEP]


def _sens(seed: int = 0) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in SHAPES:
        base = float(torch.rand(1, generator=g)) + 0.01
        out[l.name] = {"w3g32": base * 4, "w4": base * 1.5, "w4g32": base, "w8": base * 0.01}
    return out


def test_parse_format_and_palette():
    assert parse_format("w4g64").bits == 4 and parse_format("w4g64").group == 64
    assert parse_format("w8").group is None and parse_format(KEEP).keep
    for bad in ("w9", "w4g48", "int4", "w4g"):
        with pytest.raises(ValueError):
            parse_format(bad)
    assert default_formats([16, 32, 64]) == ["w3g64", "w4", "w4g64", "w4g32", "w8", KEEP]
    assert default_formats([16, 32, 64, 128, 256]) == ["w3g128", "w4", "w4g128", "w4g64", "w8", KEEP]


@pytest.mark.parametrize("budget", [4.0, 4.6, 5.5, 8.0, 12.0])
def test_allocation_meets_budget_and_is_optimal(budget):
    sens = _sens()
    a = allocate(SHAPES, sens, FORMATS, budget, dense_bytes=2)
    assert a.effective_bits <= budget + 1e-9
    assert a.effective_bits == pytest.approx(effective_bits(SHAPES, a.layer_formats, 2), abs=1e-3)
    # brute force over every assignment: the knapsack's sum is the optimum (up to its byte rounding)
    best = math.inf
    for combo in itertools.product(FORMATS, repeat=len(SHAPES)):
        fm = dict(zip((l.name for l in SHAPES), combo))
        if effective_bits(SHAPES, fm, 2) <= budget:
            best = min(best, sum(0.0 if f == KEEP else sens[n][f] for n, f in fm.items()))
    assert a.sensitivity_total == pytest.approx(best, rel=1e-6)


def test_budget_below_smallest_format_is_a_clear_error():
    lo = min_effective_bits(SHAPES, FORMATS, 2)
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(SHAPES, _sens(), FORMATS, lo - 0.1, dense_bytes=2)


def test_more_bits_never_more_damage():
    sens = _sens(1)
    totals = [allocate(SHAPES, sens, FORMATS, b, 2).sensitivity_total for b in (4.0, 4.5, 5.0, 8.0, 12.0, 16.2)]
    assert totals == sorted(totals, reverse=True) and totals[-1] == 0.0


def test_sensitivity_cache_reused_and_corrupt_file_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"l0": {"w4g32": 0.5}}

    c1, hit1 = cached_sensitivity(tmp_path, "k1", compute, task="t", n=1, seq_len=8)
    c2, hit2 = cached_sensitivity(tmp_path, "k1", compute, task="t", n=1, seq_len=8)
    assert (hit1, hit2, len(calls)) == (False, True, 1) and c2.scores == c1.scores
    (tmp_path / "k1.json").write_text('{"key": "k1", "scores": {"l0": {"w4g3')   # truncated
    c3, hit3 = cached_sensitivity(tmp_path, "k1", compute, task="t", n=1, seq_len=8)
    assert not hit3 and len(calls) == 2 and c3.scores == {"l0": {"w4g32": 0.5}}


# --- validation against a real spec ---------------------------------------------------------------------------------

def test_validation_of_mixed_params(tiny_model_dir):
    spec = infer_spec(tiny_model_dir)
    ok = validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": 4.5}}]}, spec)
    assert ok.steps[0].params["avg_bits"] == 4.5
    cases = [({"avg_bits": 2.5}, "below the smallest"),
             ({"avg_bits": 5, "formats": ["w4g48"]}, "power of two"),
             ({"avg_bits": 5, "layer_formats": {"x": "w4"}}, "not both"),
             ({"layer_formats": {"model.layers.0.mlp.down_proj": "w4"}}, "missing")]
    for params, words in cases:
        with pytest.raises(StrategyError, match=words):
            validate_strategy({"steps": [{"method": "rtn", "params": params}]}, spec)


# --- real models --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctx(data_root, tiny_model_dir) -> StepContext:
    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _ids(tok, ctx, n=4, L=64):
    from acf.methods.calibration import calibration_ids

    return calibration_ids(tok, ctx.task, n, L, 0)


def test_fisher_orders_formats_and_tracks_direct_damage(tiny_model_dir, ctx):
    from acf.methods._common import load_dense

    model, tok = load_dense(tiny_model_dir, "cpu", "test", dtype=torch.float32)
    ids = _ids(tok, ctx)
    est = fisher_sensitivity(model, ids, ["w3g32", "w4g32", "w8"])
    for name, s in est.items():
        assert s["w3g32"] > s["w4g32"] > s["w8"] >= 0, name
    direct = direct_sensitivity(model, ids, list(est), parse_format("w3g32"))
    assert all(v > 0 for v in direct.values())
    # the model's weights are restored after each direct measurement
    again = direct_sensitivity(model, ids, list(est)[:1], parse_format("w3g32"))
    assert again[list(est)[0]] == pytest.approx(direct[list(est)[0]], rel=1e-5)


def test_fisher_sums_squared_gradients_per_window_and_keeps_none():
    """fisher_diagonal squares each window's gradient as backward produces it (a hook, so the whole model's gradients
    never exist at once): the same sums as squaring the finished gradients, a tied weight counted once per window
    with both of its uses, and no gradient left on any parameter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from acf.methods.mixed import fisher_diagonal

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.randint(0, 64, (3, 12))
    params = {"emb": model.model.embed_tokens.weight, "q0": model.model.layers[0].self_attn.q_proj.weight}
    got, tokens = fisher_diagonal(model, ids, params, seed=0)
    assert tokens == 3 * 11 and all(p.grad is None for p in model.parameters())
    # the same pass by hand: one backward per window, squared finished gradients
    gen = torch.Generator(device="cpu").manual_seed(0)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):
        logits = model(input_ids=ids[i:i + 1]).logits[0, :-1].float()
        y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        for n, p in params.items():
            want[n] += p.grad.float() ** 2
    for n in params:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-9), n


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {"act_order": True, "calib_samples": 4,
                                                                   "seq_len": 64})])
def test_mixed_model_reloads_in_allocated_formats_at_predicted_size(method, extra, tiny_model_dir, tmp_path, ctx):
    from transformers import AutoModelForCausalLM

    from acf.methods import run_strategy

    spec = infer_spec(tiny_model_dir)
    strat = validate_strategy({"steps": [{"method": method, "params": {
        "avg_bits": 5.0, "formats": ["w3g32", "w4g32", "w8", KEEP], "sensitivity_samples": 4, "sensitivity_seq_len": 64,
        **extra}}]}, spec)
    recs = run_strategy(strat, tiny_model_dir, tmp_path / "out", ctx)
    assert recs[-1].status == "ok", recs[-1].reason
    facts = recs[-1].extra["mixed_precision"]
    alloc = facts["allocation"]
    assert alloc["effective_bits"] <= 5.0 and len(set(alloc["layer_formats"].values())) >= 2
    assert abs(facts["size_prediction_error"]) < 0.01
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    seen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in alloc["layer_formats"]:
            sch = getattr(mod, "quantization_scheme", None)
            seen[name] = KEEP if sch is None else (f"w{sch.weights.num_bits}" + (
                f"g{sch.weights.group_size}" if sch.weights.group_size else ""))
    assert seen == alloc["layer_formats"]
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3, 4]])).logits).all()
    # replaying the recorded allocation reproduces the same formats without a sensitivity pass
    replay = validate_strategy({"steps": [{"method": "rtn", "params": {"layer_formats": alloc["layer_formats"]}}]},
                               spec)
    recs2 = run_strategy(replay, tiny_model_dir, tmp_path / "replay", ctx)
    assert recs2[-1].status == "ok", recs2[-1].reason
    assert recs2[-1].extra["mixed_precision"]["allocation"]["layer_formats"] == alloc["layer_formats"]
    cfg = json.loads((tmp_path / "replay" / "config.json").read_text())["quantization_config"]
    # compressed-tensors renames the groups (group_0, ...): one per quantized format
    assert len(cfg["config_groups"]) == len({f for f in alloc["layer_formats"].values() if f != KEEP})


def _exits(params, in_dir, out_dir, ctx):
    raise SystemExit(143)      # what a SIGTERM handler does mid-step


def test_exit_inside_a_step_stops_the_run_not_the_step(tiny_model_dir, tmp_path, ctx):
    """A process told to stop (SIGTERM -> SystemExit) must stop; it is not a failed method (found when a killed
    benchmark recorded 'gptq failed: SystemExit: 143' and went on to its next configuration)."""
    from acf.methods import _IMPL, register, run_strategy
    from acf.methods.strategy import Step

    register("exits_now", "test_mixed:_exits")
    try:
        with pytest.raises(SystemExit):
            run_strategy([Step(method="exits_now")], tiny_model_dir, tmp_path / "out", ctx)
    finally:
        _IMPL.pop("exits_now", None)
    assert not (tmp_path / "out").exists()
