"""Loading a step's input model and saving its output, for the method modules and for lifecycle (merge, export):
full-precision loading of compressed checkpoints, stored dtypes, sparsity masks, library versions, progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from acf.core.errors import MethodFailed
from acf.methods.memory import Shape
from acf.models.loading import load_tokenizer, torch_dtype_for
from acf.models.spec import infer_spec


def quant_method(path: Path) -> Optional[str]:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return (cfg.get("quantization_config") or {}).get("quant_method")


def load_dense(path: Path, device: str, method: str, dtype: Optional[torch.dtype] = None,
               trust_remote_code: bool = False):
    """Load a full-precision model to compress or train. A compressed-tensors checkpoint (e.g. a pruned model saved
    sparse) is decompressed on load so later steps see ordinary dense `nn.Linear` weights (zeros included)."""
    from transformers import AutoModelForCausalLM

    qm = quant_method(path)
    kwargs: dict[str, Any] = {"dtype": dtype or torch_dtype_for(device), "trust_remote_code": trust_remote_code}
    if device.startswith("cuda"):
        # straight onto the GPU: a CPU copy first would need the whole model in RAM and a second transfer (8B: 16 GB)
        kwargs["device_map"] = {"": device}
    if qm == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        if _is_quantized_ct(path):
            raise MethodFailed(method, "config", f"input {path} is already quantized (compressed-tensors); "
                                                 f"{method} needs a full-precision input")
    elif qm is not None:
        raise MethodFailed(method, "config", f"input {path} is quantized ({qm}); {method} needs a full-precision input")
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    _drop_ct_quantizer(model)
    return model, load_tokenizer(path, trust_remote_code)


def _is_quantized_ct(path: Path) -> bool:
    cfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return bool(cfg.get("config_groups"))


def _drop_ct_quantizer(model) -> None:
    """A decompressed sparse checkpoint still carries its compressed-tensors config; once the weights are dense
    in memory it is only metadata, and keeping it would make `save_pretrained` re-emit a stale sparsity config."""
    if getattr(model, "hf_quantizer", None) is not None and quant_method_of(model) == "compressed-tensors":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False


def quant_method_of(model) -> Optional[str]:
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return None
    return q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)


def stored_dtype(path: Path) -> Optional[torch.dtype]:
    """The dtype the checkpoint's weights are stored in (config `dtype`, or `torch_dtype` in older configs)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if name is None and isinstance(cfg.get("text_config"), dict):
        name = cfg["text_config"].get("dtype") or cfg["text_config"].get("torch_dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None


def save_model(model, tokenizer, out_dir: Path, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> None:
    """Save model + tokenizer. `dtype` casts floating weights back to the input checkpoint's dtype first: methods
    compute in fp32 on CPU (bf16 matmuls are slow there), and saving fp32 would double a bf16 model's size on
    disk, which would be charged to the compression method."""
    if dtype is not None:
        model.to(dtype)
        model.config.dtype = dtype
    _drop_irreversible_conversions(model)
    model.save_pretrained(str(out_dir), **kwargs)
    tokenizer.save_pretrained(str(out_dir))


def _drop_irreversible_conversions(model) -> None:
    """transformers 5.17 remembers the load-time weight conversions and reverts them on save; the bitsandbytes
    deserialization ops have no reverse (NotImplementedError), so a model *loaded* from a bnb checkpoint (QLoRA)
    cannot be saved. Its weights are already in bnb's serialisable form in memory, so those ops are dropped."""
    convs = getattr(model, "_weight_conversions", None)
    if not convs:
        return
    keep = []
    for c in convs:
        try:
            c.reverse_transform()
            keep.append(c)
        except NotImplementedError:
            pass
    model._weight_conversions = keep


# --- sparsity masks --------------------------------------------------------------------------------------------
# Recovery training after pruning must not refill the pruned weights, or the sparsity the search paid for is lost.
# Neither peft nor torch keeps masks across optimizer steps for plain nn.Linear, so we record exact-zero masks for
# weights that are substantially sparse and re-apply them (after each optimizer step / after merging LoRA).

_SPARSE_MIN = 0.10   # a weight with >=10% exact zeros was pruned; random-init or trained weights have ~none


def sparsity_masks(model) -> dict[str, torch.Tensor]:
    masks = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            w = mod.weight
            if w.dtype.is_floating_point:
                m = w.detach() != 0
                if 1.0 - m.float().mean().item() >= _SPARSE_MIN:
                    masks[name] = m
    return masks


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    if not masks:
        return
    mods = dict(model.named_modules())
    for name, m in masks.items():
        mod = mods.get(name)
        if mod is None:   # peft wraps names: base_model.model.<name>.base_layer
            mod = mods.get(f"base_model.model.{name}.base_layer") or mods.get(f"base_model.model.{name}")
        if mod is not None:
            mod.weight.mul_(m.to(mod.weight.device, mod.weight.dtype))


def linear_sparsity(model) -> float:
    z = n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head") and mod.weight.dtype.is_floating_point:
            z += int((mod.weight == 0).sum())
            n += mod.weight.numel()
    return z / max(n, 1)


def versions(*pkgs: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in pkgs:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def report(ctx, label: str, done: int, total: int) -> None:
    if ctx.progress is not None:
        ctx.progress(label, done, total)


def shape_of(path: Path, trust_remote_code: bool = False):
    """The shape facts acf.methods.memory plans with, read from a model directory's config (meta device)."""
    return Shape.of(infer_spec(path, trust_remote_code))


def enable_checkpointing(model) -> None:
    """Gradient checkpointing, non-reentrant: works on a frozen base with adapters (no input-grad hook needed)."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model) -> None:
    """Undo `enable_checkpointing` before saving: the saved config must keep the KV cache on for generation."""
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True
