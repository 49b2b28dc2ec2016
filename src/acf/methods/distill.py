"""Knowledge distillation from the uncompressed teacher into the current (pruned / shallower) student.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, reference)
on the task's train prompts + reference solutions, both terms over the solution tokens (the positions the
evaluation's answer NLL scores). The student trains every weight (float32, AdamW), or, for models of 1B+ parameters
on a GPU (`adapters`), through LoRA adapters on its frozen bf16 weights, merged afterwards, with the teacher
resident in bf16: at 8B the full-parameter form would need ~171 GiB (acf.methods.memory).
T^2 keeps the KL gradient scale independent of T (Hinton et al., 2015).
Hand-written loss + loop: no installed library distils into an arbitrary transformers student (llm-compressor 0.14
ships no distillation modifier; peft/transformers have no KD loss).
"""

from __future__ import annotations

from pathlib import Path

import torch

from acf.core.errors import MethodFailed
from acf.models.loading import free
from acf.methods.base import StepContext
from acf.methods.model_io import (apply_masks, disable_checkpointing, enable_checkpointing, linear_sparsity,
                                 load_dense, save_model, shape_of, sparsity_masks, stored_dtype, versions)
from acf.methods.training_loop import autocast, train_loop
from acf.methods.memory import DISTILL_TARGETS, distill_memory, distill_plan
from acf.methods.calibration import training_examples


def distill(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    if ctx.teacher_dir is None:
        raise MethodFailed("distill", "config", "no teacher: the step context has no teacher_dir (the uncompressed model)")
    teacher_dir = Path(ctx.teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MethodFailed("distill", "input", f"teacher directory {teacher_dir} has no config.json")
    dev = ctx.device
    shape = shape_of(in_dir, ctx.trust_remote_code)
    plan = distill_plan(params, shape, dev)
    # Full-parameter: student weights in fp32 (AdamW on bf16 weights loses small updates). Through adapters: the
    # base is frozen, so it stays in the device's inference dtype (8B on a GPU: 16 GB instead of 128 GB of fp32
    # weights, gradients and AdamW moments). The teacher is always in the inference dtype, without gradients.
    student, tok = load_dense(in_dir, dev, "distill", dtype=getattr(torch, plan["student_dtype"]),
                              trust_remote_code=ctx.trust_remote_code)
    teacher, _ = load_dense(teacher_dir, dev, "distill", trust_remote_code=ctx.trust_remote_code)
    student.to(dev)
    teacher.to(dev).eval()
    teacher.requires_grad_(False)
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise MethodFailed("distill", "shape", f"student vocabulary {vs} != teacher vocabulary {vt}")
    T, alpha = float(params["temperature"]), float(params["alpha"])
    examples = training_examples(tok, ctx.task, params["samples"], params["seq_len"], ctx.seed, "distill")
    masks = sparsity_masks(student)
    sp_before = linear_sparsity(student)
    if plan["gradient_checkpointing"]:
        enable_checkpointing(student)
    model = student
    if plan["adapters"]:
        from peft import LoraConfig, get_peft_model

        targets = [t for t in DISTILL_TARGETS if t in shape.block_linears]
        if not targets:
            raise MethodFailed("distill", "config", f"adapters: none of {DISTILL_TARGETS} are Linear layers here")
        rank = int(params["adapter_rank"])
        model = get_peft_model(student, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                                                   task_type="CAUSAL_LM"))

    def loss_fn(b: dict, out) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), autocast(dev):
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        sel = b["labels"][:, 1:] != -100
        # only the positions that predict solution tokens, before any float32 copy of the (N, vocab) logits
        s = out.logits[:, :-1][sel].float()
        t = t_logits[:, :-1][sel].float()
        del t_logits
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                        log_target=True, reduction="batchmean")
        ce = torch.nn.functional.cross_entropy(s, b["labels"][:, 1:][sel])
        loss = alpha * T * T * kl + (1 - alpha) * ce
        return loss, {"kl": kl.item(), "ce": ce.item()}

    res = train_loop("distill", model, examples, steps=params["steps"], lr=params["lr"],
                     batch_size=params["batch_size"], pad_id=tok.pad_token_id, ctx=ctx, loss_fn=loss_fn,
                     masks=None if plan["adapters"] else masks)
    teacher_layers = teacher.config.num_hidden_layers
    del teacher
    free()
    if plan["adapters"]:
        student = model.merge_and_unload()
        apply_masks(student, masks)    # the merged delta is dense: keep the pruned weights at zero
    extra = {**res, "teacher": str(teacher_dir), "student_layers": student.config.num_hidden_layers,
             "teacher_layers": teacher_layers, "train_examples": len(examples), "plan": plan,
             "memory_estimate": distill_memory(params, shape, dev).as_dict(),
             "sparsity_kept": bool(masks), "sparsity_before": round(sp_before, 4),
             "sparsity_after": round(linear_sparsity(student), 4),
             "libraries": versions("torch", "transformers", "peft")}
    if plan["gradient_checkpointing"]:
        disable_checkpointing(student)
    save_model(student, tok, out_dir, dtype=stored_dtype(in_dir))
    free(student, model)
    return extra
