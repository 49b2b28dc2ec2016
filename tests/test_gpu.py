"""CUDA code paths (marked `gpu`: skipped without CUDA, run on the lent GPU machine).

bitsandbytes int8/NF4 on CUDA, QLoRA on an NF4 base, CUDA peak memory and synchronised latency, llm-compressor
calibration with a CUDA execution device, and one pipeline episode on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from acf.methods.base import StepContext
from acf.methods.run_steps import run_strategy
from acf.methods.strategy import validate_strategy
from acf.tasks import get_task

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gctx(data_root, tiny_model_dir) -> StepContext:
    return StepContext(device="cuda", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _run_ok(steps, src, out, ctx):
    recs = run_strategy(validate_strategy({"steps": steps}, device="cuda"), src, out, ctx)
    assert all(r.status == "ok" for r in recs), [r.reason for r in recs]
    return recs


@pytest.mark.parametrize("method,cls", [("bnb_int8", "Linear8bitLt"), ("bnb_nf4", "Linear4bit")])
def test_bnb_on_cuda_reloads_and_generates(method, cls, tiny_model_dir, tmp_path, gctx):
    from acf.models.loading import load_model

    recs = _run_ok([{"method": method}], tiny_model_dir, tmp_path / "m", gctx)
    assert recs[0].device.startswith("cuda") and recs[0].peak_memory_bytes and recs[0].peak_memory_bytes > 0
    model, tok = load_model(tmp_path / "m", "cuda")
    kinds = {type(m).__name__ for m in model.modules()}
    assert cls in kinds
    enc = tok(["Question: 2+2?"], return_tensors="pt").to("cuda")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_qlora_on_cuda(tiny_model_dir, tmp_path, gctx):
    recs = _run_ok([{"method": "bnb_nf4"},
                    {"method": "lora", "params": {"qlora": True, "steps": 6, "batch_size": 2, "seq_len": 64,
                                                  "samples": 16, "lr": 1e-3}}], tiny_model_dir, tmp_path / "q", gctx)
    ex = recs[-1].extra
    assert ex["qlora"] and ex["heldout_loss_adapter"] < ex["heldout_loss_before"]
    assert (tmp_path / "q" / "config.json").is_file()


def test_llmcompressor_gptq_calibrates_on_cuda(tiny_model_dir, tmp_path, gctx):
    recs = _run_ok([{"method": "gptq", "params": {"bits": 4, "group_size": 32, "calib_samples": 4, "seq_len": 32}}],
                   tiny_model_dir, tmp_path / "g", gctx)
    assert recs[0].device.startswith("cuda")
    assert recs[0].peak_memory_bytes is not None and recs[0].peak_memory_bytes > 0  # CUDA was really used


def test_cuda_memory_and_synchronised_latency(tiny_model_dir, data_root):
    from acf.evaluation import evaluate

    r = evaluate(tiny_model_dir, get_task("gsm8k"), ["memory", "latency", "answer_nll"], limit=4, device="cuda",
                 latency_tokens=8, show_progress=False)
    weights = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    mem = r.metrics["memory"]
    assert "max_memory_allocated" in mem.method and mem.value >= weights * 0.4   # bf16 on GPU: half the fp32 file
    assert r.metrics["latency"].value > 0 and "cuda" in r.metrics["latency"].device
    assert r.metrics["answer_nll"].value > 0


def test_pipeline_episode_on_cuda(tiny_model_dir, data_root, tmp_path):
    from rich.console import Console

    from acf.coordinator.run_context import RunConfig
    from acf.coordinator.single_process import run_in_terminal

    cfg = RunConfig(model=str(tiny_model_dir), run_dir=str(tmp_path / "run"), episodes=2, device="cuda",
                    objectives=["answer_nll", "size"], limit=4, proxy_limit=None, calib_samples=4, seq_len=64,
                    min_retention=None, quant_methods=["bnb_nf4", "gptq"], prune_methods=["none"],
                    skip_sanity=True)   # a random-init model is broken by design
    ctx = run_in_terminal(cfg, Console(file=open(os.devnull, "w")))
    assert all(c.status == "ok" for c in ctx.ff.candidates), [c.reason for c in ctx.ff.candidates]
    assert "cuda" in ctx.ff.run.device_name


# ---- memory-lean recovery and the generation engine (issue 18) ------------------------------------------------------

def test_lora_on_a_bf16_base_with_checkpointing_trains_and_stays_under_its_estimate(tiny_model_dir, tmp_path, gctx):
    recs = _run_ok([{"method": "lora", "params": {"gradient_checkpointing": True, "steps": 6, "batch_size": 2,
                                                  "seq_len": 64, "samples": 16, "lr": 1e-3}}],
                   tiny_model_dir, tmp_path / "l", gctx)
    ex = recs[0].extra
    assert ex["plan"] == {"base_dtype": "bfloat16", "gradient_checkpointing": True}
    assert ex["heldout_loss_adapter"] < ex["heldout_loss_before"]
    assert recs[0].peak_memory_bytes <= ex["memory_estimate"]["estimated_peak_bytes"] * 1.5
    cfg = (tmp_path / "l" / "config.json").read_text()
    assert '"use_cache": true' in cfg      # checkpointing is undone before saving


def test_distill_through_adapters_on_cuda_keeps_sparsity(tiny_model_dir, tmp_path, gctx):
    recs = _run_ok([{"method": "magnitude", "params": {"sparsity": 0.5}},
                    {"method": "distill", "params": {"adapters": True, "adapter_rank": 8, "gradient_checkpointing": True,
                                                     "steps": 6, "batch_size": 2, "seq_len": 64, "samples": 16,
                                                     "lr": 1e-3}}], tiny_model_dir, tmp_path / "d", gctx)
    ex = recs[-1].extra
    assert ex["plan"]["adapters"] and ex["plan"]["student_dtype"] == "bfloat16"
    # a random tiny student equal to its teacher bar the pruning has nothing to learn in 6 steps: finite losses
    assert all(x == x for x in ex["loss_curve"])
    assert abs(ex["sparsity_after"] - ex["sparsity_before"]) < 1e-3


def test_continuous_batching_returns_what_padded_batches_return(tiny_model_dir, data_root, monkeypatch):
    from acf.evaluation.generate import generate_all
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cuda")
    task = get_task("gsm8k")
    prompts = [task.chat_prompt(it, tok, 0) for it in task.load("test", limit=12, seed=0)]
    monkeypatch.setenv("ACF_GEN_ENGINE", "continuous")
    cont, eng = generate_all(model, tok, prompts, 24, batch_size=4, done_pattern=r"\n\n")
    assert "continuous" in eng
    monkeypatch.setenv("ACF_GEN_ENGINE", "padded")
    pad, eng2 = generate_all(model, tok, prompts, 24, batch_size=4, done_pattern=r"\n\n")
    assert "padded" in eng2 and "cuDNN attention off" in eng2
    # greedy on the same weights: the same text, bar bf16 ties broken differently by other kernels
    same = sum(a[0] == b[0] for a, b in zip(cont, pad))
    assert same >= len(prompts) - 2, list(zip(cont, pad))
    # the model still scores teacher-forced after the engine (attention implementation restored)
    out = model(input_ids=torch.tensor([[1, 2, 3]], device="cuda"))
    assert torch.isfinite(out.logits).all()


def test_vllm_engine_where_vllm_is_installed(tiny_model_dir, data_root, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed here: the vllm engine is opt-in where it is")
    from acf.evaluation.generate import generate_all
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cuda")
    prompts = [get_task("gsm8k").chat_prompt(it, tok, 0) for it in get_task("gsm8k").load("test", limit=4, seed=0)]
    monkeypatch.setenv("ACF_GEN_ENGINE", "vllm")
    outs, eng = generate_all(model, tok, prompts, 16, batch_size=4)
    assert eng.startswith("vLLM") and len(outs) == 4
