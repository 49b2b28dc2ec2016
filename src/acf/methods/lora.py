"""LoRA recovery fine-tuning with peft (and QLoRA on a bitsandbytes 4-bit base).

LoRA: adapters on the target Linear layers, trained with CE on the task's train prompts + solutions, then merged
with `merge_and_unload` so the output is a plain checkpoint; the adapter is also saved in peft format under
`out_dir/adapter/`. When the input was pruned, the merged weights are re-masked (the merged LoRA delta is dense and
would otherwise refill the pruned weights, undoing the sparsity).

QLoRA (`qlora=True`, input produced by bnb_nf4): trained on the 4-bit base after `prepare_model_for_kbit_training`,
then merged by peft into the 4-bit layers (peft dequantizes, adds the delta and re-quantizes), and saved as a
bitsandbytes 4-bit checkpoint that `from_pretrained` loads as-is. The re-quantization rounds part of the small LoRA
delta away, so the record carries the held-out loss before training, with the adapter, and after merging: the cost
of merging is measured, not assumed. The unmerged adapter (exact) is in `out_dir/adapter/` for use on that base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from acf.core.errors import MethodFailed
from acf.models.loading import free, load_tokenizer
from acf.methods.base import StepContext
from acf.methods.model_io import (apply_masks, disable_checkpointing, enable_checkpointing, linear_sparsity,
                                 load_dense, quant_method, save_model, shape_of, sparsity_masks, stored_dtype,
                                 versions)
from acf.methods.memory import lora_memory, lora_plan
from acf.methods.training_loop import causal_ce, eval_loss, train_loop
from acf.methods.calibration import training_examples

_HELD_OUT = 16   # examples kept out of training to measure the loss before/after


def _present_targets(model, wanted: list[str]) -> list[str]:
    """Requested target names that exist as Linear (or bnb Linear) leaf names in the model."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    return [t for t in wanted if t in leaves]


def lora(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from peft import LoraConfig, get_peft_model

    dev = ctx.device
    qlora = bool(params.get("qlora"))
    qm = quant_method(in_dir)
    shape = shape_of(in_dir, ctx.trust_remote_code)
    plan = lora_plan(params, shape, dev)
    if qlora:
        if qm != "bitsandbytes" or not _is_4bit(in_dir):
            raise MethodFailed("lora", "config", f"qlora needs a bitsandbytes 4-bit input (bnb_nf4); {in_dir} is "
                                                 f"{qm or 'not quantized'}")
        model = load_kbit(in_dir, dev, trust_remote_code=ctx.trust_remote_code,
                          checkpointing=plan["gradient_checkpointing"])
        tok = load_tokenizer(in_dir, ctx.trust_remote_code)
    else:
        # A frozen base needs no float32 master weights (AdamW updates only the adapters, which peft keeps in
        # float32): bf16 on a GPU halves the base (8B: 16 GB instead of 32). The CPU keeps float32 (its bf16
        # matmuls are slow without AVX-512 BF16, and small models fit).
        model, tok = load_dense(in_dir, dev, "lora", dtype=getattr(torch, plan["base_dtype"]),
                                trust_remote_code=ctx.trust_remote_code)
        model.to(dev)
        if plan["gradient_checkpointing"]:
            enable_checkpointing(model)
    targets = _present_targets(model, list(params["targets"]))
    if not targets:
        raise MethodFailed("lora", "config", f"none of the target modules {params['targets']} exist in this model")
    masks = {} if qlora else sparsity_masks(model)
    examples = training_examples(tok, ctx.task, params["samples"] + _HELD_OUT, params["seq_len"], ctx.seed, "lora")
    held, train = examples[:_HELD_OUT], examples[_HELD_OUT:] or examples
    pad = tok.pad_token_id
    loss_before = eval_loss(model, held, pad, dev)
    cfg = LoraConfig(r=params["rank"], lora_alpha=params["alpha"], lora_dropout=params["dropout"],
                     target_modules=targets, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    n_train = sum(p.numel() for p in pm.parameters() if p.requires_grad)

    def loss_fn(b: dict, out) -> tuple[torch.Tensor, dict]:
        return causal_ce(out.logits, b["labels"]), {}

    res = train_loop("lora", pm, train, steps=params["steps"], lr=params["lr"], batch_size=params["batch_size"],
                     pad_id=pad, ctx=ctx, loss_fn=loss_fn)
    loss_adapter = eval_loss(pm, held, pad, dev)
    adapter_dir = out_dir / "adapter"
    pm.save_pretrained(str(adapter_dir))
    _note_adapter_base(adapter_dir, in_dir, qlora)
    merged = pm.merge_and_unload()
    apply_masks(merged, masks)
    if plan["gradient_checkpointing"]:
        disable_checkpointing(merged)
    loss_merged = eval_loss(merged, held, pad, dev)
    extra: dict[str, Any] = {**res, "targets": targets, "trainable_params": n_train, "train_examples": len(train),
                             "heldout_loss_before": loss_before, "heldout_loss_adapter": loss_adapter,
                             "heldout_loss_merged": loss_merged, "heldout_examples": len(held), "qlora": qlora,
                             "plan": plan, "memory_estimate": lora_memory(params, shape, dev).as_dict(),
                             "libraries": versions("peft", "transformers", "torch", "bitsandbytes")}
    if qlora:
        extra["output_form"] = "bitsandbytes 4-bit with the LoRA delta merged (peft dequantize+add+requantize)"
        save_model(merged, tok, out_dir)
    else:
        extra.update(sparsity_kept=bool(masks), sparsity_after=round(linear_sparsity(merged), 4),
                     output_form="dense checkpoint with the LoRA delta merged")
        save_model(merged, tok, out_dir, dtype=stored_dtype(in_dir))
    free(merged, pm, model)
    return extra


def _is_4bit(path: Path) -> bool:
    q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    return bool(q.get("load_in_4bit"))


def load_kbit(path: Path, dev: str, *, trust_remote_code: bool = False, quantize_nf4: bool = False,
              training: bool = True, checkpointing: bool = False):
    """A bitsandbytes 4-bit model: `path` already stored in 4-bit (the qlora step's input) or, with `quantize_nf4`, a
    full-precision model quantized to NF4 (double quantization) while loading (the adapter loop's QLoRA base, see
    acf.lifecycle). With `training`, prepared for adapters on a frozen 4-bit base."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {}
    if quantize_nf4:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map={"": dev}, trust_remote_code=trust_remote_code,
                                                 **kw)
    if training:
        # Casts norms/embeddings to fp32 and enables input grads so adapters train on a frozen 4-bit base.
        # Gradient checkpointing only where asked (large models): it adds a forward to every step.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        _keep_trainable_4bit_layout(model)
    return model


def _keep_trainable_4bit_layout(model) -> None:
    """Keep bitsandbytes' trainable 4-bit layout on CPUs with AVX512-BF16.

    On such CPUs a Linear4bit repacks its weight into an inference-only layout the first time it runs in eval mode
    without grad (as the held-out loss does); after that, a training forward adds the bias in place to a view and
    autograd refuses it ("a view of a leaf Variable ... in-place operation", bitsandbytes 0.50.2). Switching the
    repacking off for the layers being trained keeps one layout throughout; inference elsewhere is untouched."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def _note_adapter_base(adapter_dir: Path, in_dir: Path, qlora: bool) -> None:
    """The adapter's recorded base path is the step's temporary input, which is removed after the run: say so."""
    p = adapter_dir / "adapter_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        cfg["base_model_name_or_path"] = None
        p.write_text(json.dumps(cfg, indent=2))
    (adapter_dir / "README-acf.txt").write_text(
        "LoRA adapter in peft format, trained by acf. Its base is the model this step received (a "
        f"{'bitsandbytes 4-bit' if qlora else 'full-precision'} checkpoint produced by the previous step, not kept). "
        "The parent directory already holds the merged model.\n")
