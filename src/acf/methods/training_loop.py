"""The small training loop shared by distillation, LoRA, kd_tune and the adapter loop (acf.lifecycle.training): AdamW,
grad clipping, optional sparsity masks.

Hand-written rather than transformers.Trainer: a few dozen steps with a custom KD loss do not need its
machinery (accelerate state, output dirs, callbacks), and a plain loop reports losses step by step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator, Optional

import torch

from acf.core.errors import MethodFailed
from acf.methods.base import StepContext
from acf.methods.model_io import apply_masks, report
from acf.methods.calibration import TrainExample, batch_stream, collate


@functools.lru_cache(maxsize=None)
def cpu_bf16_fast() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 / AMX). Measured on the 2-core AMD EPYC dev machine
    (avx512_bf16): a SmolLM2-135M LoRA step (batch 4 x 256 tokens, forward + backward) takes 3.5 s under bf16
    autocast vs 6.9 s in fp32, with the same loss to 3 decimals. Without such kernels bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private torch probe: absent on some builds
        return False


def _bf16(device: str) -> bool:
    return device.startswith("cuda") or (device == "cpu" and cpu_bf16_fast())


def autocast(device: str):
    """bf16 autocast where the device computes bf16 fast; the trainable weights themselves stay fp32."""
    if _bf16(device):
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_precision(device: str) -> str:
    """What `autocast(device)` does, for the step record."""
    return "bf16 autocast, fp32 weights" if _bf16(device) else "fp32"


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite (no update was made): each caller words the error for its user."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"loss {value} at step {step}")


def adamw_steps(trainable: list, examples: list[TrainExample], *, steps: int, lr: float, batch_size: int, pad_id: int,
                device: str, seed: int, loss_of_batch: Callable[[dict], tuple[torch.Tensor, dict]],
                groups: Optional[list[dict]] = None) -> Iterator[tuple[int, torch.Tensor, dict]]:
    """The AdamW loop the methods (`train_loop`) and the adapter loop (acf.lifecycle) share: `steps` seeded batches,
    `loss_of_batch(batch) -> (loss, parts)`, grad-norm clipping at 1.0. Yields (step, loss, parts) after each update;
    raises NonFiniteLoss before updating on a NaN/inf loss. The caller may stop early by leaving the loop.
    `groups`: AdamW parameter groups with their own learning rates (the same tensors as `trainable`)."""
    opt = torch.optim.AdamW(groups or trainable, lr=lr, weight_decay=0.0)
    for step, batch in enumerate(batch_stream(examples, batch_size, steps, seed), start=1):
        b = collate(batch, pad_id, device)
        loss, parts = loss_of_batch(b)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(step, loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step, loss, parts


def train_loop(method: str, model, examples: list[TrainExample], *, steps: int, lr: float, batch_size: int,
               pad_id: int, ctx: StepContext, loss_fn: Callable[[dict, dict], tuple[torch.Tensor, dict]],
               masks: Optional[dict] = None, params=None, groups: Optional[list[dict]] = None) -> dict:
    """Run `steps` AdamW steps; `loss_fn(batch, outputs) -> (loss, parts)`; returns loss curves (floats).
    `groups`: AdamW parameter groups with their own learning rates; their tensors are the ones trained."""
    if groups:
        params = [p for g in groups for p in g["params"]]
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not trainable:
        raise MethodFailed(method, "config", "no trainable parameters")
    model.train()
    curve: list[float] = []
    parts_curves: dict[str, list[float]] = {}
    dev = ctx.device

    def loss_of_batch(b: dict) -> tuple[torch.Tensor, dict]:
        with autocast(dev):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        return loss_fn(b, out)

    stepper = adamw_steps(trainable, examples, steps=steps, lr=lr, batch_size=batch_size, pad_id=pad_id, device=dev,
                          seed=ctx.seed, loss_of_batch=loss_of_batch, groups=groups)
    try:
        for step, loss, parts in stepper:
            apply_masks(model, masks or {})
            curve.append(round(float(loss.item()), 5))
            for k, v in parts.items():
                parts_curves.setdefault(k, []).append(round(float(v), 5))
            report(ctx, method, step, steps)
            if step == 1 or step % 10 == 0 or step == steps:
                ctx.log.info("%s step %d/%d loss %.4f %s", method, step, steps, curve[-1],
                             " ".join(f"{k} {v[-1]:.4f}" for k, v in parts_curves.items()))
    except NonFiniteLoss as e:
        raise MethodFailed(method, "diverged", f"loss became {e.value} at step {e.step} (lr {lr} too high?)") from None
    model.eval()
    return {"loss_curve": curve, **{f"{k}_curve": v for k, v in parts_curves.items()}, "precision": train_precision(dev),
            "loss_first": curve[0], "loss_last": curve[-1],
            "loss_first5_mean": _mean(curve[:5]), "loss_last5_mean": _mean(curve[-5:])}


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 5) if xs else math.nan


def causal_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over positions whose label is not -100."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def eval_loss(model, examples: list[TrainExample], pad_id: int, device: str, batch_size: int = 8) -> float:
    """Token-weighted CE on `examples` (labels != -100), eval mode: a before/after check that does not depend on
    dropout or on the training batches' order."""
    was = model.training
    model.eval()
    tot = n = 0.0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id, device)
        with autocast(device):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        k = int((b["labels"][:, 1:] != -100).sum())
        tot += causal_ce(logits, b["labels"]).item() * k
        n += k
    model.train(was)
    return round(tot / max(n, 1), 5)
