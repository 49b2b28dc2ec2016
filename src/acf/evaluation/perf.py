"""Cost metrics: latency, peak memory, size on disk, parameters, sparsity, effective bits per weight."""

from __future__ import annotations

import json
import os
import statistics
import struct
import time
from pathlib import Path
from typing import Optional

import torch

from acf.core.instruments import dir_size
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.models.facts import ST_BITS
from acf.models.tokenization import prompt_text


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def size_metric(path: str | os.PathLike) -> Measurement:
    """Bytes on disk of what `from_pretrained` loads: the directory's own files (weights, config, tokenizer).

    Sub-folders are extras a user does not need to serve the model (LoRA's unmerged `adapter/`, logs); they are
    reported in `extra` but not counted, so a merged LoRA model is not charged for its optional adapter copy.
    """
    root = Path(path)
    own = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    extras = {p.name + "/": dir_size(p) for p in root.iterdir() if p.is_dir()}
    return Measurement(value=float(own), unit="bytes", device="disk", runtime="",
                       method="bytes of the model directory's own files (weights, config, tokenizer); "
                              "sub-folders such as adapter/ not counted",
                       extra={"not_counted": extras} if extras else {})


def stored_tensor_bits(path: str | os.PathLike) -> Optional[int]:
    """Total bits of all tensors stored in the safetensors files (read from their headers, no weights loaded)."""
    files = list(Path(path).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k == "__metadata__":
                continue
            cnt = 1
            for d in v["shape"]:
                cnt *= d
            total += cnt * ST_BITS.get(v["dtype"], 16)
    return total


#: parameters a quantized model carries beside its weights (compressed-tensors, when loaded in transformers):
#: metadata of the stored format, not parameters of the model, so a W4 model has the baseline's parameter count
QUANT_METADATA = tuple(f"{w}_{k}" for w in ("weight", "input", "output")
                       for k in ("scale", "zero_point", "g_idx", "global_scale", "shape", "packed"))


def model_stats(model) -> dict:
    """Parameter count (logical) and sparsity of Linear weights (share of exact zeros)."""
    total_params = 0
    seen = set()
    zeros, lin = 0, 0
    for name, mod in model.named_modules():
        shape = getattr(mod, "weight_shape", None)
        if getattr(mod, "weight", None) is None and isinstance(shape, torch.Tensor) and shape.numel() in (1, 2, 3):
            # compressed-tensors keeps a quantized Linear packed (weight_packed int32 + weight_shape): count the
            # logical weight it stands for
            n = 1
            for d in shape.tolist():
                n *= int(d)
            total_params += n
            continue
        w = getattr(mod, "weight", None)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        n = _logical_numel(w)
        total_params += n
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head") and w.dtype.is_floating_point:
            zeros += int((w == 0).sum().item())
            lin += w.numel()
    for name, p in model.named_parameters():
        if not name.endswith("weight") and id(p) not in seen and not name.endswith(QUANT_METADATA):
            seen.add(id(p))
            total_params += p.numel()
    return {"params": total_params, "linear_zeros": zeros, "linear_weights": lin}


def _logical_numel(w) -> int:
    qs = getattr(w, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:  # bnb 4-bit stores packed bytes
        n = 1
        for d in qs.shape:
            n *= d
        return n
    return w.numel()


def latency(model, tokenizer, prompt: str, *, new_tokens: int = 32, repeats: int = 3, throughput_batch: int = 8) -> dict:
    """Batch-1 time to first token and decode ms/token (after one warm-up), and throughput at a batch size."""
    device = str(next(model.parameters()).device)
    prompt = prompt_text(tokenizer, prompt)
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(device)
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)

    def timed(max_new, inputs):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, **kw)
        _sync(device)
        return time.perf_counter() - t, out.shape[1] - inputs["input_ids"].shape[1]

    timed(new_tokens, enc)  # warm-up: kernels, caches, lazy init
    ttfts, decodes = [], []
    for _ in range(repeats):
        t1, _n1 = timed(1, enc)
        tn, nn = timed(new_tokens, enc)
        ttfts.append(t1)
        decodes.append((tn - t1) / max(nn - 1, 1))
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    batch = tokenizer([prompt] * throughput_batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = old
    tb, nb = timed(new_tokens, batch)
    dev, rt = device_string(device), runtime_string()
    ttft = statistics.median(ttfts)
    dec = statistics.median(decodes)
    meth = f"median of {repeats} after 1 warm-up, greedy, {new_tokens} new tokens, prompt {enc['input_ids'].shape[1]} tokens"
    return {
        "latency": Measurement(value=dec * 1000, unit="ms/token", device=dev, runtime=rt, n=repeats,
                               method="batch-1 decode time per token: " + meth, extra={"ttft_ms": ttft * 1000}),
        "ttft": Measurement(value=ttft * 1000, unit="ms", device=dev, runtime=rt, n=repeats,
                            method="batch-1 time to first token: " + meth),
        "throughput": Measurement(value=throughput_batch * nb / tb, unit="tokens/s", device=dev, runtime=rt, n=1,
                                  method=f"batch {throughput_batch}, {new_tokens} new tokens each, after warm-up"),
    }
