"""Step memory estimates (acf.methods.memory) and preflight's refusal at Llama-3.1-8B shape, on the CPU.

The figures are checked against measured GPU peaks by experiments/bench_scale.py (SPEC.md); here: the plans the
steps follow, the order of magnitude of each estimate, and that preflight refuses what cannot fit and says why."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from acf.methods.memory import GiB, Shape, distill_memory, distill_plan, lora_memory, lora_plan
from acf.methods.params import DistillParams, LoraParams


@pytest.fixture(scope="module")
def spec8b(tmp_path_factory, tiny_model_dir):
    """The spec of a Llama-3.1-8B-shaped config (meta device: no weights) with the tiny model's tokenizer."""
    from transformers import LlamaConfig

    from acf.models.spec import infer_spec

    d = tmp_path_factory.mktemp("m8b")
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False).save_pretrained(d)
    for f in Path(tiny_model_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, d / f.name)
    return infer_spec(d)


def test_shape_of_an_8b_spec(spec8b):
    s = Shape.of(spec8b)
    assert 7.9e9 < s.params < 8.1e9 and s.layers == 32 and s.kv_width == 1024
    assert s.block_linears["down_proj"] == (14336, 4096)


def test_lean_training_is_chosen_for_large_models_on_a_gpu_only(spec8b):
    s = Shape.of(spec8b)
    lp = LoraParams().model_dump()
    assert lora_plan(lp, s, "cuda") == {"base_dtype": "bfloat16", "gradient_checkpointing": True}
    assert lora_plan(lp, s, "cpu") == {"base_dtype": "float32", "gradient_checkpointing": False}
    assert lora_plan({**lp, "gradient_checkpointing": False}, s, "cuda")["gradient_checkpointing"] is False
    dp = DistillParams().model_dump()
    assert distill_plan(dp, s, "cuda")["adapters"] and not distill_plan(dp, s, "cpu")["adapters"]


def test_estimates_have_the_right_order_of_magnitude_at_8b(spec8b):
    s = Shape.of(spec8b)
    lp = {**LoraParams().model_dump(), "batch_size": 4, "seq_len": 512}
    lean = lora_memory(lp, s, "cuda").total
    assert 16 * GiB < lean < 30 * GiB                       # 16 GB of bf16 weights + modest activations
    assert lora_memory({**lp, "gradient_checkpointing": False}, s, "cuda").total > lean + 5 * GiB
    dp = {**DistillParams().model_dump(), "batch_size": 4, "seq_len": 512}
    adapters = distill_memory(dp, s, "cuda").total
    full = distill_memory({**dp, "adapters": False}, s, "cuda").total
    assert 30 * GiB < adapters < 60 * GiB and full > 120 * GiB


def test_an_allocating_quantizer_is_budgeted_for_its_fisher_pass(spec8b):
    """avg_bits runs a Fisher sensitivity pass before the quantizer (float32 sums of every allocated weight): the
    step's estimate is the larger of the two; replayed layer_formats or a plain recipe need no pass."""
    from acf.methods.registry import estimate_step_memory

    s = Shape.of(spec8b)
    plain = {"bits": 4, "group_size": 128, "calib_samples": 128, "seq_len": 2048}
    gptq = estimate_step_memory("gptq", plain, s, "cuda")
    mixed = estimate_step_memory("gptq", {**plain, "avg_bits": 4.25}, s, "cuda")
    assert gptq.total < 20 * GiB and "Fisher" not in gptq.describe()
    assert mixed.parts["Fisher sums (float32)"] == s.linear_params() * 4          # 26 GiB at this shape
    assert 40 * GiB < mixed.total < 55 * GiB and "Fisher sensitivity pass" in mixed.how
    replay = estimate_step_memory("gptq", {**plain, "avg_bits": 4.25, "layer_formats": {"x": "w4g128"}}, s, "cuda")
    assert replay.total == gptq.total
    gguf = estimate_step_memory("gguf", {"avg_bits": 5.5}, s, "cuda")
    assert gguf.parts["Fisher sums (float32)"] == s.params * 4                       # GGUF allocates every tensor


def _ctx(spec, device: str, tmp_path):
    return SimpleNamespace(cfg=SimpleNamespace(device=device, min_free_disk_bytes=1), dir=tmp_path, spec=spec, ff=None)


def test_preflight_refuses_a_step_that_cannot_fit_naming_its_figures(spec8b, tmp_path):
    from acf.coordinator.preflight import preflight
    from acf.methods.strategy import Strategy

    full = Strategy.model_validate({"steps": [{"method": "distill", "params": {"adapters": False}}]})
    why = preflight(_ctx(spec8b, "cuda", tmp_path), full, free_bytes=80 * GiB)
    assert why and why.startswith("GPU memory: 80.0 GiB free") and "distill" in why
    assert "full-parameter student in float32 with AdamW" in why and "teacher 15.0" in why and "GiB" in why
    # the same step through adapters fits the same GPU; LoRA on a bf16 base too
    lean = Strategy.model_validate({"steps": [{"method": "distill"}]})
    assert preflight(_ctx(spec8b, "cuda", tmp_path), lean, free_bytes=80 * GiB) is None
    lora = Strategy.model_validate({"steps": [{"method": "lora"}]})
    assert preflight(_ctx(spec8b, "cuda", tmp_path), lora, free_bytes=80 * GiB) is None
    # on a 24 GiB CPU machine the float32 LoRA base alone does not fit: refused before loading anything
    why = preflight(_ctx(spec8b, "cpu", tmp_path), lora, free_bytes=24 * GiB)
    assert why and why.startswith("RAM: 24.0 GiB free") and "float32 base" in why and "weights 29.9" in why


def test_every_declared_method_has_a_memory_estimate(spec8b):
    from acf.methods.registry import all_methods, estimate_step_memory

    s = Shape.of(spec8b)
    for spec in all_methods().values():
        est = estimate_step_memory(spec.name, {}, s, "cuda")
        assert est is not None and est.total >= s.params * 2, spec.name
