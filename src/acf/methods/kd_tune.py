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

Hand-written: llm-compressor 0.14 has no post-quantization training of unquantized parameters, and a compressed
checkpoint cannot be re-saved by transformers once decompressed; the trained tensors are written back into the
checkpoint's safetensors files by name (`splice_tensors`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from acf.core.errors import MethodFailed
from acf.methods._common import disable_checkpointing, enable_checkpointing, load_dense, shape_of, versions
from acf.methods._train import autocast, train_loop
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
    values are copied into a model built from the same config without the quantization config."""
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    kw: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                "quantization_config": CompressedTensorsConfig(run_compressed=False)}
    if device.startswith("cuda"):
        kw["device_map"] = {"": device}
    q = AutoModelForCausalLM.from_pretrained(str(in_dir), **kw)
    quantized = {n for n, m in q.named_modules() if getattr(m, "quantization_scheme", None) is not None}
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


def trainable_groups(student, quantized: set[str], lr: float, embedding_lr: float) -> tuple[list[dict], list[str]]:
    """AdamW groups over what the checkpoint stores in 16 bits: the embedding / output table (if not quantized) at
    `embedding_lr`, every other unquantized parameter (norms, biases) at `lr`. Quantized weights stay frozen."""
    frozen = {f"{n}.weight" for n in quantized}
    emb_ids = {id(student.get_input_embeddings().weight)}
    out = student.get_output_embeddings()
    if out is not None and "lm_head" not in {n.rsplit(".", 1)[-1] for n in quantized}:
        emb_ids.add(id(out.weight))
    emb, rest, names = [], [], []
    for n, p in student.named_parameters():
        train = n not in frozen and (embedding_lr > 0 or id(p) not in emb_ids)
        p.requires_grad_(train)
        if not train:
            continue
        if p.dtype != torch.float32:
            p.data = p.data.float()   # AdamW on bf16 values loses updates smaller than their precision
        (emb if id(p) in emb_ids else rest).append(p)
        names.append(n)
    groups = [g for g in ({"params": emb, "lr": embedding_lr}, {"params": rest, "lr": lr}) if g["params"]]
    if not groups:
        raise MethodFailed(M, "config", "nothing to train: every parameter is quantized or frozen")
    return groups, names


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


def kd_tune(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    if ctx.teacher_dir is None:
        raise MethodFailed(M, "config", "no teacher: the step context has no teacher_dir (the uncompressed model)")
    teacher_dir = Path(ctx.teacher_dir)
    if not (teacher_dir / "config.json").is_file():
        raise MethodFailed(M, "input", f"teacher directory {teacher_dir} has no config.json")
    weight_only_groups(in_dir)
    dev = ctx.device
    shape = shape_of(in_dir, ctx.trust_remote_code)
    # the frozen weights stay in the device's inference dtype (bf16 on a GPU); the trained ones become float32
    student, quantized = dense_student(in_dir, dev, torch_dtype_for(dev), ctx.trust_remote_code)
    tok = load_tokenizer(in_dir, ctx.trust_remote_code)
    teacher, _ = load_dense(teacher_dir, dev, M, trust_remote_code=ctx.trust_remote_code)
    teacher.to(dev).eval()
    teacher.requires_grad_(False)
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if vs != vt:
        raise MethodFailed(M, "shape", f"student vocabulary {vs} != teacher vocabulary {vt}")
    groups, names = trainable_groups(student, quantized, float(params["lr"]), float(params["embedding_lr"]))
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
    splice_tensors(in_dir, out_dir, trained)
    n_trained = sum(t.numel() for t in trained.values())
    free(student)
    return {**res, "teacher": str(teacher_dir), "train_examples": len(examples),
            "train_text": calibration_facts(ctx.task, params["samples"], ctx.calib_mix, M),
            "trained_tensors": len(trained),
            "trained_params": n_trained, "frozen_quantized_modules": len(quantized),
            "loss": "KL(teacher || student), T=1, every non-padding position; no reference-token term",
            "gradient_checkpointing": ckpt, "memory_estimate": kd_tune_memory(params, shape, dev).as_dict(),
            "libraries": versions("torch", "transformers", "compressed-tensors", "safetensors")}
