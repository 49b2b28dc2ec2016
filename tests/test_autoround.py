"""AutoRound as a first-class quantizer: per-layer formats (avg_bits / layer_formats) through llm-compressor's
AutoRoundModifier on the tiny random Llama (CPU, a few iterations), its place in the search space, and its time and
memory estimates. Uniform AutoRound W4 is run with the other llm-compressor methods in tests/test_methods.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acf.methods.base import StepContext
from acf.methods.mixed import KEEP
from acf.methods.strategy import validate_strategy
from acf.models.spec import infer_spec
from acf.tasks import get_task

FAST = {"iters": 2, "calib_samples": 4, "seq_len": 32}


@pytest.fixture(scope="module")
def ctx(data_root, tiny_model_dir) -> StepContext:
    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _formats_of(model, names) -> dict[str, str]:
    """Each named Linear's format as compressed-tensors reloaded it ('bf16' where it has no scheme)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name in names:
            sch = getattr(mod, "quantization_scheme", None)
            out[name] = KEEP if sch is None else (f"w{sch.weights.num_bits}" + (
                f"g{sch.weights.group_size}" if sch.weights.group_size else ""))
    return out


def _max_distinct_per_group(w: torch.Tensor, group) -> int:
    rows = w.reshape(-1, group) if group else w
    return max(int(r.unique().numel()) for r in rows)


def _run(params: dict, src: Path, out: Path, ctx: StepContext):
    from acf.methods.run_steps import run_strategy

    strat = validate_strategy({"steps": [{"method": "autoround", "params": params}]}, infer_spec(src))
    recs = run_strategy(strat, src, out, ctx)
    assert recs[-1].status == "ok", recs[-1].reason
    return recs[-1]


def test_autoround_avg_bits_writes_the_allocated_formats(tiny_model_dir, tmp_path, ctx):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    rec = _run({"avg_bits": 5.0, "formats": ["w3g32", "w4g32", "w8", KEEP], "sensitivity_samples": 4,
                "sensitivity_seq_len": 32, "target": "transformers", **FAST}, tiny_model_dir, tmp_path / "out", ctx)
    facts = rec.extra["mixed_precision"]
    alloc = facts["allocation"]
    assert alloc["effective_bits"] <= 5.0 and len(set(alloc["layer_formats"].values())) >= 2
    assert abs(facts["size_prediction_error"]) < 0.01
    assert "auto-round" in rec.extra["libraries"]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert len(cfg["config_groups"]) == len({f for f in alloc["layer_formats"].values() if f != KEEP})
    # the saved config names every layer's allocated format (exact names rank before the class target)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert _formats_of(m, alloc["layer_formats"]) == alloc["layer_formats"]
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 2, 3, 4]])).logits).all()
    # and each layer was rounded in its own format, not AutoRound's default one
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                 quantization_config=CompressedTensorsConfig(run_compressed=False))
    mods = dict(plain.named_modules())
    from acf.methods.mixed import parse_format

    for name, f in alloc["layer_formats"].items():
        fmt = parse_format(f)
        if not fmt.keep:
            assert _max_distinct_per_group(mods[name].weight.detach(), fmt.group) <= 2 ** fmt.bits, (name, f)


def test_autoround_layer_formats_leave_kept_layers_unrounded(tiny_model_dir, tmp_path, ctx):
    """Layers an allocation keeps in 16 bits must not be rounded by AutoRound: llm-compressor passes them to it as
    ignore_layers only when its targets match inside a block (acf.methods.quantize.autoround_groups)."""
    from safetensors.torch import load_file

    spec = infer_spec(tiny_model_dir)
    names = [l.name for l in spec.linears if not l.name.endswith("lm_head")]
    fmts = {n: KEEP if n.endswith(("v_proj", "down_proj")) else "w8" if n.endswith("k_proj") else
            "w3g32" if i % 2 else "w4g32" for i, n in enumerate(names)}
    rec = _run({"layer_formats": fmts, "target": "transformers", **FAST}, tiny_model_dir, tmp_path / "out", ctx)
    assert rec.extra["mixed_precision"]["allocation"]["layer_formats"] == fmts
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    kept = [n for n, f in fmts.items() if f == KEEP]
    assert kept
    for n in kept:
        # AutoRound computes in bf16 on the CPU (its amp dtype) and casts the block it tunes: the float32 test model's
        # kept weights come back bf16-rounded, never on a quantization grid
        w = after[n + ".weight"]
        assert torch.equal(w, before[n + ".weight"].to(torch.bfloat16).to(w.dtype))
        assert (n + ".weight_packed") not in after


def test_autoround_avg_bits_then_kd_tune_validates(tiny_model_dir):
    spec = infer_spec(tiny_model_dir)
    # 5.5: the tiny float32 model's smallest allocation vLLM can serve is 5.03 bits (headers and scales of 64-wide
    # layers), above the 4.5 a transformers target reaches with 3-bit formats
    s = validate_strategy({"steps": [{"method": "autoround", "params": {"avg_bits": 5.5}},
                                     {"method": "kd_tune", "params": {"steps": 10}}]}, spec)
    assert s.steps[0].params["avg_bits"] == 5.5 and s.steps[0].params["iters"] == 200
    assert "autoround(" in s.describe() and "avg_bits=5.5" in s.describe()
    with pytest.raises(Exception, match="below the smallest"):
        validate_strategy({"steps": [{"method": "autoround", "params": {"avg_bits": 2.5}}]}, spec)


def test_autoround_avg_bits_then_kd_tune_runs(tiny_model_dir, tmp_path, ctx):
    """kd_tune reads the allocated checkpoint (its first group also targets "Linear") and keeps it quantized."""
    from acf.methods.run_steps import run_strategy

    s = validate_strategy({"steps": [
        {"method": "autoround", "params": {"avg_bits": 5.0, "formats": ["w3g32", "w4g32", "w8", KEEP],
                                           "sensitivity_samples": 4, "sensitivity_seq_len": 32,
                                           "target": "transformers", **FAST}},
        {"method": "kd_tune", "params": {"steps": 2, "batch_size": 2, "seq_len": 64, "samples": 8}}]},
        infer_spec(tiny_model_dir))
    recs = run_strategy(s, tiny_model_dir, tmp_path / "out", ctx)
    assert [(r.method, r.status) for r in recs] == [("autoround", "ok"), ("kd_tune", "ok")], [r.reason for r in recs]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["config_groups"]


def test_autoround_is_in_the_default_space_with_a_precision_dimension(tiny_model_dir):
    import optuna

    from acf.methods.registry import choices
    from acf.search.space import SearchSpace

    assert "autoround" in choices("quant")
    spec = infer_spec(tiny_model_dir)
    space = SearchSpace(spec, "cpu", 4, 64)
    grid = [g for g in space.grid() if g.get("quant_only") == "autoround"]
    assert [(g["bits"], g["precision"]) for g in grid] == [(4, "uniform")]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(150):
        trial = study.ask()
        s = space.suggest(trial)
        ar = [st for st in s.steps if st.method == "autoround"]
        if ar:
            validate_strategy(s, spec)
            seen.add("avg_bits" if ar[0].params.get("avg_bits") is not None else "uniform")
            assert "iters" not in ar[0].params     # AutoRound's default 200 iterations
        study.tell(trial, 0.0)
    assert seen == {"avg_bits", "uniform"}
    # the space's fixed entries (seeds, grid) naming autoround replay into strategies that validate
    fixed = [d for d in space.seeds() + space.grid() if d.get("quant_only") == "autoround"]
    assert fixed
    for d in fixed:
        study.enqueue_trial(d)
        s = validate_strategy(space.suggest(study.ask()), spec)
        assert s.steps[0].method == "autoround"
        assert (s.steps[0].params.get("avg_bits") is None) == (d.get("precision", "uniform") == "uniform")


def test_autoround_estimates_are_marked_and_scale_with_their_params():
    from transformers import LlamaConfig

    from acf.methods.memory import GiB, Shape, autoround_batch, autoround_memory, sensitivity_pass
    from acf.methods.params import AutoRoundParams
    from acf.methods.registry import estimate_step_seconds

    s = Shape.of_config(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
    p = AutoRoundParams().model_dump()
    assert autoround_batch(p) == 8 and autoround_batch({**p, "calib_samples": 4}) == 4
    gpu = autoround_memory(p, s, "cuda")
    assert "estimate" in gpu.how and "not measured" in gpu.how
    assert 16 * GiB < gpu.total < 40 * GiB                     # 16 GB of bf16 weights + one block's tuning state
    cpu = autoround_memory(p, s, "cpu")
    assert "calibration activations" in cpu.parts and "calibration activations" not in gpu.parts
    assert autoround_memory({**p, "batch_size": 32}, s, "cuda").total > gpu.total
    mixed = {**p, "avg_bits": 4.5}
    assert autoround_memory(mixed, s, "cuda").total >= sensitivity_pass(mixed, s, "cuda", "autoround").total
    base = estimate_step_seconds("autoround", {"iters": 50}, 135_000_000, "cuda")
    assert estimate_step_seconds("autoround", {"iters": 200}, 135_000_000, "cuda") > base
    # fewer calibration samples than the batch: the batch that runs is the samples there are
    assert (estimate_step_seconds("autoround", {"calib_samples": 4, "batch_size": 8}, 10 ** 9, "cuda")
            == estimate_step_seconds("autoround", {"calib_samples": 4, "batch_size": 4}, 10 ** 9, "cuda"))
    assert (estimate_step_seconds("autoround", {"avg_bits": 4.5}, 10 ** 9, "cuda")
            > estimate_step_seconds("autoround", {}, 10 ** 9, "cuda"))
