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


# --- target vllm: one format per fused layer (pure) ---------------------------------------------------------------

#: two decoder blocks' q/k/v (fused by vLLM), o, gate/up (fused) and down, at widths vLLM's kernels take
BLOCKS = [LayerShape(name=f"b{b}.{n}", out_features=o, in_features=i) for b in range(2) for n, o, i in
          (("self_attn.q_proj", 128, 128), ("self_attn.k_proj", 64, 128), ("self_attn.v_proj", 64, 128),
           ("self_attn.o_proj", 128, 128), ("mlp.gate_proj", 256, 128), ("mlp.up_proj", 256, 128),
           ("mlp.down_proj", 128, 256))]
VLLM_FORMATS = ["w4g32", "w4", "w8", KEEP]


def _block_sens(layers, formats, seed=0) -> dict[str, dict[str, float]]:
    """Fake sensitivities that pull the members of a fused layer apart: q far more sensitive than k and v."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in layers:
        base = (float(torch.rand(1, generator=g)) + 0.01) * (50.0 if l.name.endswith("q_proj") else 1.0)
        scale = {"w3": 4.0, "w4": 1.0, "w8": 0.01}
        out[l.name] = {f: base * scale[f[:2]] * (0.8 if "g" in f else 1.0) for f in formats if f != KEEP}
    return out


def _fused_formats_agree(layer_formats: dict[str, str]) -> bool:
    from acf.methods.vllm_rules import fused_groups

    return all(len({layer_formats[m] for m in ms}) == 1 for ms in fused_groups(layer_formats).values())


@pytest.mark.parametrize("budget", [4.6, 5.5, 8.5])
def test_vllm_target_gives_a_fused_layer_one_format_at_its_summed_cost_and_damage(budget):
    """Under target vllm the knapsack's items are fused layers: each gets one format, costing and hurting what its
    members together do, and the choice is optimal over those items (brute force); under transformers the same
    sensitivities split q from k/v."""
    sens = _block_sens(BLOCKS, VLLM_FORMATS)
    a = allocate(BLOCKS, sens, VLLM_FORMATS, budget, 2, target="vllm")
    assert _fused_formats_agree(a.layer_formats) and a.effective_bits <= budget + 1e-9
    assert a.predicted_bytes == sum(layer_bytes(parse_format(a.layer_formats[l.name]), l.out_features,
                                                l.in_features, 2, l.name) for l in BLOCKS)
    from acf.methods.vllm_rules import fused_groups

    groups = list(fused_groups([l.name for l in BLOCKS]).values())
    best = math.inf
    for combo in itertools.product(VLLM_FORMATS, repeat=len(groups)):
        fm = {m: f for ms, f in zip(groups, combo) for m in ms}
        if effective_bits(BLOCKS, fm, 2) <= budget:
            best = min(best, sum(0.0 if f == KEEP else sens[n][f] for n, f in fm.items()))
    assert a.sensitivity_total == pytest.approx(best, rel=1e-6)
    free = allocate(BLOCKS, sens, VLLM_FORMATS, budget, 2, target="transformers")
    assert free.sensitivity_total <= a.sensitivity_total + 1e-12
    if budget == 5.5:
        assert not _fused_formats_agree(free.layer_formats)   # what vLLM would refuse


def test_vllm_target_offers_only_formats_vllm_kernels_serve():
    """3-bit formats (no in-tree vLLM kernel), and a group that does not divide a member's width, are not offered;
    the floor rises accordingly and the default palette drops them."""
    from acf.methods.mixed import offered, target_palette

    q = LayerShape(name="b.self_attn.q_proj", out_features=128, in_features=128)
    assert not offered(parse_format("w3g32"), [q], "vllm") and offered(parse_format("w3g32"), [q], "transformers")
    assert offered(parse_format("w4g128"), [q], "vllm") and offered(parse_format("w8"), [q], "vllm")
    assert not offered(parse_format("w4g16"), [q], "vllm")     # Marlin: channel, 32, 64, 128 (+256 at 4 bits)
    wide = LayerShape(name="b.mlp.down_proj", out_features=64, in_features=512)
    assert offered(parse_format("w4g256"), [wide], "vllm") and not offered(parse_format("w8g256"), [wide], "vllm")
    assert target_palette(default_formats([16, 32, 64]), "vllm") == ["w4", "w4g64", "w4g32", "w8", KEEP]
    assert target_palette(default_formats([16, 32, 64]), "transformers") == default_formats([16, 32, 64])
    pal = ["w3g32", "w4g32", "w8", KEEP]
    assert (min_effective_bits(BLOCKS, pal, 2, "vllm") > min_effective_bits(BLOCKS, pal, 2, "transformers"))
    with pytest.raises(ValueError, match="target vllm"):
        allocate(BLOCKS, _block_sens(BLOCKS, pal), pal, min_effective_bits(BLOCKS, pal, 2, "transformers"), 2,
                 target="vllm")


def _spec_of(config, tok_dir: Path, out: Path):
    """A spec (acf.models.spec.infer_spec: meta device) for a config built with transformers' classes, with the
    tiny model's tokenizer beside it."""
    import shutil

    out.mkdir(parents=True)
    config.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return infer_spec(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_vllm_target_on_real_specs_fuses_qkv_and_gate_up_per_block(arch, tiny_model_dir, tmp_path):
    """The spec's own layer names (Llama, Qwen2 with q/k/v biases, Gemma 3) group as vLLM fuses them: one format
    for q/k/v and one for gate/up in every block, at budgets from the floor to 8 bits."""
    from transformers import Gemma3TextConfig, Qwen2Config

    from acf.methods.mixed import items
    from acf.methods.mixed_step import palette

    kw = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    if arch == "llama":
        spec = infer_spec(tiny_model_dir)
    elif arch == "qwen2":
        spec = _spec_of(Qwen2Config(**kw), tiny_model_dir, tmp_path / arch)
    else:
        spec = _spec_of(Gemma3TextConfig(head_dim=32, **kw), tiny_model_dir, tmp_path / arch)
    assert spec.family == arch
    shapes = [LayerShape(name=l.name, out_features=l.out_features, in_features=l.in_features) for l in spec.linears
              if l.name != "lm_head"]
    groups = items(shapes, "vllm", spec.family)
    assert len(groups) == 4 * spec.num_layers                           # qkv, o, gate_up, down per block
    assert sorted(len(g) for g in groups) == [1] * (2 * spec.num_layers) + [2] * spec.num_layers + [3] * spec.num_layers
    formats = palette({"target": "vllm"}, shapes)
    assert all(not f.startswith("w3") for f in formats)
    lo = min_effective_bits(shapes, formats, spec.bytes_per_param, "vllm", spec.family)
    sens = _block_sens(shapes, formats, seed=1)
    for budget in (lo, (lo + 8) / 2, 8.0):
        a = allocate(shapes, sens, formats, budget, spec.bytes_per_param, "vllm", spec.family)
        assert _fused_formats_agree(a.layer_formats), a.layer_formats
        for i in range(spec.num_layers):
            blk = {n.rsplit(".", 1)[-1]: f for n, f in a.layer_formats.items() if f".layers.{i}." in n}
            assert blk["q_proj"] == blk["k_proj"] == blk["v_proj"] and blk["gate_proj"] == blk["up_proj"]


# --- validation against a real spec ---------------------------------------------------------------------------------

def test_validation_of_mixed_params(tiny_model_dir):
    spec = infer_spec(tiny_model_dir)
    ok = validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": 5.5}}]}, spec)
    assert ok.steps[0].params["avg_bits"] == 5.5 and ok.steps[0].params["target"] == "vllm"
    cases = [({"avg_bits": 2.5}, "below the smallest"),
             ({"avg_bits": 5, "formats": ["w4g48"]}, "power of two"),
             ({"avg_bits": 5, "layer_formats": {"x": "w4"}}, "not both"),
             ({"layer_formats": {"model.layers.0.mlp.down_proj": "w4"}}, "missing")]
    for params, words in cases:
        for target in ("vllm", "transformers"):
            with pytest.raises(StrategyError, match=words):
                validate_strategy({"steps": [{"method": "rtn", "params": {**params, "target": target}}]}, spec)
    # target vllm (the default): formats vLLM serves, one per fused layer, whole fused layers ignored
    names = [l.name for l in spec.linears if l.name != "lm_head"]
    split = {n: "w8" if n.endswith("k_proj") else "w4g32" for n in names}
    assert validate_strategy({"steps": [{"method": "rtn", "params": {"layer_formats": split, "target":
                                                                     "transformers"}}]}, spec)
    vllm_cases = [({"layer_formats": split}, r"cannot load in vLLM.*model\.layers\.0\.self_attn\.qkv_proj: shards "
                                             r"in different formats \(q_proj=w4g32, k_proj=w8, v_proj=w4g32\)"),
                  ({"layer_formats": {n: "w3g32" for n in names}}, r"3-bit weights"),
                  ({"avg_bits": 6, "formats": ["w3g32", "w4g32", "bf16"]}, "formats not served by vLLM.*w3g32"),
                  ({"avg_bits": 6, "ignore": ["lm_head", "q_proj"]}, r"ignore covers part of fused layer"),
                  ({"avg_bits": 4.5}, r"below the smallest.*target vllm")]
    for params, words in vllm_cases:
        with pytest.raises(StrategyError, match=words):
            validate_strategy({"steps": [{"method": "rtn", "params": params}]}, spec)
    assert validate_strategy({"steps": [{"method": "rtn", "params": {"avg_bits": 4.5, "target": "transformers"}}]},
                             spec)
    whole = {n: "w4g32" if "self_attn" in n else "w8" for n in names}
    assert validate_strategy({"steps": [{"method": "rtn", "params": {"layer_formats": whole}}]}, spec)


# --- real models --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctx(data_root, tiny_model_dir) -> StepContext:
    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _ids(tok, ctx, n=4, L=64):
    from acf.methods.calibration import calibration_ids

    return calibration_ids(tok, ctx.task, n, L, 0)


def test_fisher_orders_formats_and_tracks_direct_damage(tiny_model_dir, ctx):
    from acf.methods.model_io import load_dense

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
        "target": "transformers", **extra}}]}, spec)
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
    replay = validate_strategy({"steps": [{"method": "rtn", "params": {"layer_formats": alloc["layer_formats"],
                                                                        "target": "transformers"}}]}, spec)
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
