"""Knowledge distillation from the uncompressed teacher into the current (pruned / shallower) student.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, reference)
on the task's train prompts + reference solutions, both terms over the solution tokens (the positions the
evaluation's answer NLL scores). T^2 keeps the KL gradient scale independent of T (Hinton et al., 2015).
Hand-written loss + loop: no installed library distils into an arbitrary transformers student (llm-compressor 0.14
ships no distillation modifier; peft/transformers have no KD loss).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MethodFailed
from ..models import free
from .base import StepContext
from ._common import linear_sparsity, load_dense, save_model, sparsity_masks, stored_dtype, versions
from ._train import autocast, causal_ce, train_loop
from .calibration import training_examples


def distill(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    if ctx.teacher_dir is None:
        raise MethodFailed("distill", "config", "no teacher: the step context has no teacher_dir (the uncompressed model)")
    teacher_dir = Path(ctx.teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MethodFailed("distill", "input", f"teacher directory {teacher_dir} has no config.json")
    dev = ctx.device
    # Student weights in fp32 (AdamW on bf16 weights loses small updates); teacher in the device's inference dtype.
    student, tok = load_dense(in_dir, dev, "distill", dtype=torch.float32, trust_remote_code=ctx.trust_remote_code)
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

    def loss_fn(b: dict, out) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), autocast(dev):
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        s = out.logits[:, :-1].float()
        t = t_logits[:, :-1].float()
        sel = b["labels"][:, 1:] != -100
        s, t = s[sel], t[sel]                                        # (N, V) positions that predict solution tokens
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                        log_target=True, reduction="batchmean")
        ce = causal_ce(out.logits, b["labels"])
        loss = alpha * T * T * kl + (1 - alpha) * ce
        return loss, {"kl": kl.item(), "ce": ce.item()}

    res = train_loop("distill", student, examples, steps=params["steps"], lr=params["lr"],
                     batch_size=params["batch_size"], pad_id=tok.pad_token_id, ctx=ctx, loss_fn=loss_fn, masks=masks)
    teacher_layers = teacher.config.num_hidden_layers
    del teacher
    free()
    extra = {**res, "teacher": str(teacher_dir), "student_layers": student.config.num_hidden_layers,
             "teacher_layers": teacher_layers, "train_examples": len(examples),
             "sparsity_kept": bool(masks), "sparsity_before": round(sp_before, 4),
             "sparsity_after": round(linear_sparsity(student), 4), "libraries": versions("torch", "transformers")}
    save_model(student, tok, out_dir, dtype=stored_dtype(in_dir))
    free(student)
    return extra
