"""Distillation after quantization: the uncompressed teacher's next-token distributions are distilled into the
parameters a weight-only quantizer kept in 16 bits (the embedding / tied lm_head table and the RMSNorm weights),
while every quantized weight stays frozen on its grid. The output is the same compressed-tensors checkpoint, the
same bytes on disk, with those 16-bit tensors replaced.

Why: nothing in a one-shot quantizer (GPTQ, AWQ, RTN) adjusts the tensors it leaves in 16 bits to the error the
quantized layers made. Measured on the default model (H100, 400 GSM8K test items, experiments/results/mixed-cuda.md;
100 steps of batch 4 x 256 train-split tokens): GPTQ 4.25 bits act-order kld 0.1056 -> 0.0661 with the table and
norms trained, 0.0667 with the norms alone (35k parameters); GPTQ W4 g64 act-order 0.1379 -> 0.0685; RTN W4 g64
0.404 -> 0.148; kld_general falls too (0.363 -> 0.256), so it is not only the task's text that improves. Norm
tweaking (Li et al., 2023, arXiv 2309.02784) tunes the norms alone by a layer-wise loss; this step takes the
teacher's distributions at the output, and can train the embedding table too (`embedding_lr`, off by default: it
bought nothing measurable above).

Loss: KL(teacher || student) at temperature 1 over every non-padding position of train-split examples (prompt +
reference solution, rendered as evaluation renders them). No term uses the reference tokens as targets, so the step
moves the model toward the uncompressed model, not toward the task: its control (the uncompressed model given the
same step) is the baseline itself, whose loss is zero from the start.

Quantization scales (`scale_lr` > 0, off by default): the per-group / per-channel `weight_scale` tensors of every
quantized Linear are trained too, their integer codes (and zero points) frozen, as MLX's DWQ ("distilled weight
quantization") does. Each such Linear's weight becomes a torch parametrization (`ScaleDequant`): compressed-tensors'
own `dequantize` of the frozen codes unpacked from `weight_packed` (`unpack_from_int32`) with the scale
`round_to_stored(scale0 * factor)`, where `factor` (float32, one per scale entry, 1 at the start) is what AdamW
trains and `scale0` is the stored scale. Relative, not the scale itself: AdamW's steps are about `lr` in absolute
size whatever the gradient, and a model's scales span orders of magnitude (per layer and per group), so one
absolute rate would be far too large for some groups and nothing for others; `scale_lr` is a relative step per
update. The forward rounds the scale to the dtype the checkpoint stores it in and computes the weight as
transformers' decompression does (in the model's load dtype), so the dense student's weight at every step is exactly
what the written checkpoint dequantizes to; the gradient passes straight through those roundings (`_Dequantize`).
Supported: compressed-tensors `pack-quantized` integer weights, symmetric or with zero points, per group or per
channel, any act-order llm-compressor 0.14 writes ("static" / "weight" only reorder calibration: no `g_idx` is
stored); anything else (a stored g_idx, tensor / block strategies, other formats, tied quantized weights) is refused
by name (`scale_layout`), and the parametrized weights are checked equal to the decompressed ones before training.

Hand-written: llm-compressor 0.14 has no post-quantization training of unquantized parameters, and a compressed
checkpoint cannot be re-saved by transformers once decompressed; the trained tensors are written back into the
checkpoint's safetensors files by name (`splice_tensors`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from acf.core.errors import MethodFailed
from acf.methods.model_io import disable_checkpointing, enable_checkpointing, load_dense, shape_of, versions
from acf.methods.training_loop import autocast, train_loop
from acf.methods.base import StepContext
from acf.methods.calibration import calibration_facts, training_examples
from acf.methods.memory import kd_tune_memory, lean
from acf.models.loading import free, load_tokenizer, torch_dtype_for

M = "kd_tune"


def weight_only_groups(in_dir: Path) -> dict:
    """The checkpoint's compressed-tensors config groups, refusing what this step cannot keep exact: a checkpoint
    that is not quantized, or one whose activations are quantized (the dense student would not see that rounding)."""
    try:
        cfg = json.loads((Path(in_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MethodFailed(M, "input", f"cannot read {in_dir}/config.json: {e}") from None
    qc = cfg.get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    if qc.get("quant_method") != "compressed-tensors" or not groups:
        raise MethodFailed(M, "config", f"{in_dir} is not a quantized compressed-tensors checkpoint: kd_tune follows "
                                        f"a weight-only quantization step (gptq, awq, rtn, autoround)")
    if any((g or {}).get("input_activations") for g in groups.values()):
        raise MethodFailed(M, "config", "the checkpoint quantizes activations (W8A8): a dense student would not "
                                        "reproduce that rounding; kd_tune follows weight-only quantization")
    return groups


def dense_student(in_dir: Path, device: str, dtype: torch.dtype, trust_remote_code: bool):
    """A plain transformers model carrying the checkpoint's dequantized weights, and the names of its quantized
    Linear modules. compressed-tensors decompresses on load (run_compressed=False) into modules with its own forward
    and offloading wrappers whose tensors were made in inference mode; autograd cannot run through them, so their
    values are copied into a model built from the same config without the quantization config. The quantized
    modules are returned as {name: compressed-tensors QuantizationScheme}."""
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    kw: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                "quantization_config": CompressedTensorsConfig(run_compressed=False)}
    if device.startswith("cuda"):
        kw["device_map"] = {"": device}
    q = AutoModelForCausalLM.from_pretrained(str(in_dir), **kw)
    quantized = {n: m.quantization_scheme for n, m in q.named_modules()
                 if getattr(m, "quantization_scheme", None) is not None}
    if not quantized:
        raise MethodFailed(M, "config", f"no quantized module found in {in_dir}")
    cfg = AutoConfig.from_pretrained(str(in_dir), trust_remote_code=trust_remote_code)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device(device):
        student = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    qsd = q.state_dict()
    target = student.state_dict()
    missing = [k for k, v in target.items() if k not in qsd or qsd[k].shape != v.shape]
    tied = getattr(cfg, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing:
        raise MethodFailed(M, "library", f"the decompressed checkpoint lacks {len(missing)} of the model's tensors "
                                         f"(e.g. {missing[:3]})")
    with torch.no_grad():
        for k, v in target.items():
            if k in qsd:
                v.copy_(qsd[k].to(v.dtype))
    if tied:
        student.tie_weights()
    del q, qsd
    free()
    return student, quantized


def trainable_groups(student, quantized, lr: float, embedding_lr: float, scale_factors: Optional[dict] = None,
                     scale_lr: float = 0.0) -> tuple[list[dict], list[str]]:
    """AdamW groups over what the checkpoint stores in 16 bits: the embedding / output table (if not quantized) at
    `embedding_lr`, every other unquantized parameter (norms, biases) at `lr`, and the quantization-scale factors
    of `install_scale_training` (`scale_factors`: module name -> factor) at `scale_lr`. Quantized weights stay
    frozen. The names returned are those of the unquantized parameters (the scales are spliced by their own names)."""
    frozen = {f"{n}.weight" for n in quantized}
    scale_ids = {id(f) for f in (scale_factors or {}).values()}
    emb_ids = {id(student.get_input_embeddings().weight)}
    out = student.get_output_embeddings()
    if out is not None and "lm_head" not in {n.rsplit(".", 1)[-1] for n in quantized}:
        emb_ids.add(id(out.weight))
    emb, rest, names = [], [], []
    for n, p in student.named_parameters():
        if id(p) in scale_ids:
            continue
        train = n not in frozen and (embedding_lr > 0 or id(p) not in emb_ids)
        p.requires_grad_(train)
        if not train:
            continue
        if p.dtype != torch.float32:
            p.data = p.data.float()   # AdamW on bf16 values loses updates smaller than their precision
        (emb if id(p) in emb_ids else rest).append(p)
        names.append(n)
    scales = list((scale_factors or {}).values())
    groups = [g for g in ({"params": emb, "lr": embedding_lr}, {"params": rest, "lr": lr},
                          {"params": scales, "lr": scale_lr}) if g["params"]]
    if not groups:
        raise MethodFailed(M, "config", "nothing to train: every parameter is quantized or frozen")
    return groups, names


# --- quantization scales (scale_lr > 0) -----------------------------------------------------------------------------

def _stored_names(in_dir: Path) -> dict[str, Path]:
    """Every tensor of the checkpoint's safetensors files: name -> file."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in sorted(Path(in_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def scale_layout(name: str, scheme, top_format: Optional[str], stored: dict) -> None:
    """Refuse (MethodFailed, naming what) a quantized module whose scales this step cannot train exactly: anything but
    compressed-tensors `pack-quantized` static integer weights with one scale per group or per output channel, and
    the stored tensors that layout needs (`weight_packed`, `weight_scale`, `weight_shape`, `weight_zero_point` if
    asymmetric). A stored `weight_g_idx` (group act-order, which compressed-tensors 0.19 no longer writes or reads:
    llm-compressor 0.14's act-order "static"/"weight" only reorders calibration) or a global scale is refused too."""
    w = getattr(scheme, "weights", None)
    fmt = getattr(scheme, "format", None)
    fmt = getattr(fmt, "value", fmt) or top_format
    where = f"scale training (scale_lr > 0): {name}"
    if w is None:
        raise MethodFailed(M, "config", f"{where} has no weight quantization")
    strategy = getattr(w.strategy, "value", w.strategy)
    qtype = getattr(w.type, "value", w.type)
    actorder = getattr(w.actorder, "value", w.actorder)
    if fmt != "pack-quantized":
        raise MethodFailed(M, "config", f"{where} is stored as {fmt!r}; only 'pack-quantized' integer weights are "
                                        f"supported")
    if qtype != "int":
        raise MethodFailed(M, "config", f"{where} quantizes to {qtype!r}; only integer weights are supported")
    if w.dynamic:
        raise MethodFailed(M, "config", f"{where} has dynamic weight scales (nothing stored to train)")
    if strategy not in ("group", "channel"):
        raise MethodFailed(M, "config", f"{where} uses the {strategy!r} strategy; only 'group' and 'channel' scales "
                                        f"are supported")
    if actorder in ("group", "dynamic") or f"{name}.weight_g_idx" in stored:
        raise MethodFailed(M, "config", f"{where} uses group act-order (a stored weight_g_idx permutes the "
                                        f"groups); not supported, only act-order 'static'/'weight' (no g_idx)")
    if f"{name}.weight_global_scale" in stored:
        raise MethodFailed(M, "config", f"{where} has a weight_global_scale (tensor-group formats): not supported")
    need = ["weight_packed", "weight_scale", "weight_shape"] + ([] if w.symmetric else ["weight_zero_point"])
    missing = [k for k in need if f"{name}.{k}" not in stored]
    if missing:
        raise MethodFailed(M, "library", f"{where}: the checkpoint lacks {', '.join(missing)}")


class _Dequantize(torch.autograd.Function):
    """weight = compressed-tensors `dequantize(codes, scale, zero_point)` with scale = round_to_stored(base *
    factor), cast to the load dtype: exactly what transformers' decompression of the checkpoint gives once the scale
    is written in its stored dtype. The library's dequantize runs without autograd, so the gradient is written
    here: d weight / d scale = (code - zero point) within the scale's group, d scale / d factor = base, straight
    through both roundings."""

    @staticmethod
    def forward(ctx, factor, base, codes, zero_point, args, stored, dtype):
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        scale = (base * factor.detach()).to(stored).to(dtype)
        ctx.save_for_backward(base, codes, zero_point)
        return dequantize(x_q=codes, scale=scale, zero_point=zero_point, args=args)

    @staticmethod
    def backward(ctx, grad):
        base, codes, zero_point = ctx.saved_tensors
        groups = base.shape[-1]
        d = codes.float().unflatten(-1, (groups, -1))
        if zero_point is not None:
            d = d - zero_point.float().unsqueeze(-1)
        g_scale = (grad.float().unflatten(-1, (groups, -1)) * d).sum(-1)
        return g_scale * base, None, None, None, None, None, None


class ScaleDequant(torch.nn.Module):
    """The parametrization of one quantized Linear's `weight` (its `original` is the trained factor, shaped as the
    stored `weight_scale`): frozen integer codes and zero points, the stored scale as `base`."""

    def __init__(self, base: torch.Tensor, codes: torch.Tensor, zero_point: Optional[torch.Tensor], args,
                 stored: torch.dtype, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("base", base, persistent=False)
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("zero_point", zero_point, persistent=False)
        self.args, self.stored, self.dtype = args, stored, dtype

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return _Dequantize.apply(factor, self.base, self.codes, self.zero_point, self.args, self.stored, self.dtype)

    def scale(self, factor: torch.Tensor) -> torch.Tensor:
        """The scale the forward uses, in the stored dtype: what is written to the checkpoint."""
        return (self.base * factor.detach()).to(self.stored)


def install_scale_training(student, in_dir: Path, quantized: dict) -> dict[str, torch.nn.Parameter]:
    """Make every quantized Linear's weight a `ScaleDequant` of its stored codes and scales (see the module's
    docstring); returns module name -> trainable factor (float32, ones). Refuses (`scale_layout`) what it cannot
    keep exact, and fails if any parametrized weight differs from the one decompressed by transformers."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open
    from torch.nn.utils import parametrize

    try:
        top_format = (json.loads((Path(in_dir) / "config.json").read_text()).get("quantization_config")
                      or {}).get("format")
    except (OSError, ValueError):
        top_format = None
    stored = _stored_names(in_dir)
    for n in sorted(quantized):
        scale_layout(n, quantized[n], top_format, stored)
    mods = dict(student.named_modules())
    emb = student.get_input_embeddings().weight
    handles: dict = {}

    def get(key: str) -> torch.Tensor:
        f = stored[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(key)

    factors: dict[str, torch.nn.Parameter] = {}
    for n in sorted(quantized):
        mod = mods.get(n)
        if not isinstance(mod, torch.nn.Linear):
            raise MethodFailed(M, "config", f"scale training (scale_lr > 0): {n} is a {type(mod).__name__}, not a "
                                            f"Linear")
        if mod.weight is emb:
            raise MethodFailed(M, "config", f"scale training (scale_lr > 0): {n} shares its weight with the "
                                            f"embedding table (tied); not supported")
        args = quantized[n].weights
        packed, scale = get(f"{n}.weight_packed"), get(f"{n}.weight_scale")
        shape = torch.Size(get(f"{n}.weight_shape").tolist())
        if packed.ndim != 2 or tuple(shape) != tuple(mod.weight.shape) or scale.ndim != 2 \
                or scale.shape[0] != shape[0] or shape[-1] % scale.shape[-1]:
            raise MethodFailed(M, "shape", f"scale training (scale_lr > 0): {n}: packed {tuple(packed.shape)}, "
                                           f"scale {tuple(scale.shape)}, shape {tuple(shape)} do not form a 2-d "
                                           f"grouped layout for weight {tuple(mod.weight.shape)}")
        dev, dtype = mod.weight.device, mod.weight.dtype
        codes = unpack_from_int32(packed, args.num_bits, shape).to(dev)
        zp = None
        if not args.symmetric:
            zp = unpack_from_int32(get(f"{n}.weight_zero_point"), args.num_bits, (*shape[:-1], scale.shape[-1]),
                                   packed_dim=0).to(dev)
        p = ScaleDequant(scale.float().to(dev), codes, zp, args, scale.dtype, dtype)
        before = mod.weight.detach()
        mod.weight = torch.nn.Parameter(torch.ones(scale.shape, dtype=torch.float32, device=dev))
        parametrize.register_parametrization(mod, "weight", p, unsafe=True)
        with torch.no_grad():
            w = mod.weight
        if not torch.equal(w, before):
            raise MethodFailed(M, "library", f"scale training (scale_lr > 0): {n}: the weight dequantized from the "
                                             f"stored codes and scales differs from transformers' decompression "
                                             f"(max |diff| {(w.float() - before.float()).abs().max().item():.3g})")
        factors[n] = mod.parametrizations.weight.original
        del before, w
    handles.clear()
    return factors


def trained_scales(student, factors: dict[str, torch.nn.Parameter]) -> tuple[dict[str, torch.Tensor], dict]:
    """The `weight_scale` tensors to splice (stored dtype, CPU) and facts on how far they moved."""
    mods = dict(student.named_modules())
    out: dict[str, torch.Tensor] = {}
    changed = entries = 0
    lo, hi = float("inf"), float("-inf")
    for n, f in factors.items():
        p = mods[n].parametrizations.weight[0]
        s = p.scale(f)
        out[f"{n}.weight_scale"] = s.cpu()
        changed += int((s != p.base.to(p.stored)).sum())
        entries += s.numel()
        lo, hi = min(lo, float(f.detach().min())), max(hi, float(f.detach().max()))
    return out, {"trained_scale_tensors": len(out), "trained_scale_entries": entries,
                 "scale_entries_changed": changed,
                 "scale_factor_range": [round(lo, 6), round(hi, 6)] if factors else None}


def splice_tensors(in_dir: Path, out_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checkpoint into `out_dir` with `tensors` replaced by name in its safetensors files (each keeps the
    dtype it had); every name must be found exactly once."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(Path(in_dir).glob("*.safetensors"))
    if not files:
        raise MethodFailed(M, "input", f"no safetensors files in {in_dir}")
    found: dict[str, int] = {}
    for f in Path(in_dir).iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy2(f, out_dir / f.name)
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata()
            data = {k: fh.get_tensor(k) for k in fh.keys()}
        for k in data:
            if k in tensors:
                if tensors[k].shape != data[k].shape:
                    raise MethodFailed(M, "shape", f"{k}: trained {tuple(tensors[k].shape)} vs stored "
                                                   f"{tuple(data[k].shape)}")
                data[k] = tensors[k].to(data[k].dtype).contiguous()
                found[k] = found.get(k, 0) + 1
        save_file(data, str(out_dir / f.name), metadata=meta)
    bad = [k for k in tensors if found.get(k) != 1]
    if bad:
        raise MethodFailed(M, "library", f"trained tensors not stored exactly once in the checkpoint: {bad[:3]}")


def train_student(params: dict, in_dir: Path, ctx: StepContext) -> tuple:
    """The training of `kd_tune` without the writing: returns (the dense student after training, in eval mode,
    {checkpoint tensor name: trained tensor}, facts). The tensors are the norms (and the table with embedding_lr > 0),
    float32, and with scale_lr > 0 each quantized Linear's `weight_scale` in its stored dtype."""
    if ctx.teacher_dir is None:
        raise MethodFailed(M, "config", "no teacher: the step context has no teacher_dir (the uncompressed model)")
    teacher_dir = Path(ctx.teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MethodFailed(M, "input", f"teacher directory {teacher_dir} has no config.json")
    weight_only_groups(in_dir)
    dev = ctx.device
    shape = shape_of(in_dir, ctx.trust_remote_code)
    scale_lr = float(params.get("scale_lr") or 0.0)
    # the frozen weights stay in the device's inference dtype (bf16 on a GPU); the trained ones become float32
    student, quantized = dense_student(in_dir, dev, torch_dtype_for(dev), ctx.trust_remote_code)
    factors = install_scale_training(student, in_dir, quantized) if scale_lr > 0 else {}
    tok = load_tokenizer(in_dir, ctx.trust_remote_code)
    teacher, _ = load_dense(teacher_dir, dev, M, trust_remote_code=ctx.trust_remote_code)
    teacher.to(dev).eval()
    teacher.requires_grad_(False)
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise MethodFailed(M, "shape", f"student vocabulary {vs} != teacher vocabulary {vt}")
    groups, names = trainable_groups(student, quantized, float(params["lr"]), float(params["embedding_lr"]),
                                     factors, scale_lr)
    examples = training_examples(tok, ctx.task, params["samples"], params["seq_len"], ctx.seed, M, ctx.calib_mix)
    ckpt = lean(dev, shape, params.get("gradient_checkpointing"))
    if ckpt:
        enable_checkpointing(student)

    def loss_fn(b: dict, out) -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), autocast(dev):
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        sel = b["attention_mask"].bool()
        s, t = out.logits[sel].float(), t_logits[sel].float()
        del t_logits
        kl = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                        reduction="batchmean")
        return kl, {"kl": kl.item()}

    res = train_loop(M, student, examples, steps=params["steps"], lr=float(params["lr"]),
                     batch_size=params["batch_size"], pad_id=tok.pad_token_id, ctx=ctx, loss_fn=loss_fn, groups=groups)
    if ckpt:
        disable_checkpointing(student)
    del teacher
    free()
    sd = dict(student.named_parameters())
    trained = {n: sd[n].detach().cpu() for n in names}
    n_trained = sum(t.numel() for t in trained.values())
    scales, scale_facts = trained_scales(student, factors)
    facts = {**res, "teacher": str(teacher_dir), "train_examples": len(examples),
             "train_text": calibration_facts(ctx.task, params["samples"], ctx.calib_mix, M),
             "trained_tensors": len(trained),
             "trained_params": n_trained, "frozen_quantized_modules": len(quantized),
             "scale_lr": scale_lr, **scale_facts,
             "loss": "KL(teacher || student), T=1, every non-padding position; no reference-token term",
             "gradient_checkpointing": ckpt, "memory_estimate": kd_tune_memory(params, shape, dev).as_dict(),
             "libraries": versions("torch", "transformers", "compressed-tensors", "safetensors")}
    if factors:
        facts["scale_parametrisation"] = ("weight = compressed-tensors dequantize(frozen codes [- zero point], "
                                          "round_to_stored(stored scale x factor)); factor per scale entry trained "
                                          "at scale_lr (a relative step), straight through the rounding")
    return student, {**trained, **scales}, facts


def kd_tune(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    student, tensors, facts = train_student(params, in_dir, ctx)
    splice_tensors(in_dir, out_dir, tensors)
    free(student)
    return facts
