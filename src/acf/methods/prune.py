"""Pruning: unstructured / N:M weight sparsity (magnitude, wanda, sparsegpt) and depth pruning (drop_layers).

Saved weights: compressed-tensors 0.19 no longer writes sparse (bitmask) checkpoints ("Sparse compression is no
longer supported by compressed-tensors"), so pruned models are saved dense with their zeros in place: the zeros
are real on reload, but the size on disk only shrinks once a later quantization step packs the weights, or
with depth pruning, which removes whole blocks.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from acf.core.errors import MethodFailed
from acf.models.loading import free
from acf.methods.base import StepContext
from acf.methods.model_io import linear_sparsity, load_dense, report, save_model, stored_dtype, versions
from acf.methods.calibration import calibration_dataset, calibration_facts, calibration_ids


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder blocks: the ModuleList whose length is config.num_hidden_layers."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    best: Optional[tuple[str, torch.nn.ModuleList]] = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or name.count(".") < best[0].count("."):
                best = (name, mod)
    if best is None:
        raise MethodFailed("prune", "shape", f"cannot find the decoder blocks (no ModuleList of length {n})")
    return best


def _nm(pattern: str) -> Optional[tuple[int, int]]:
    if pattern in (None, "", "unstructured"):
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def _prunable(model) -> list[tuple[str, torch.nn.Linear]]:
    prefix, _ = decoder_layers(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".")]


# --- magnitude ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def magnitude_prune_(model, sparsity: float, pattern: str = "unstructured") -> None:
    """Zero the smallest-|W| weights of every Linear layer inside the decoder blocks, layer by layer.

    Hand-written because llm-compressor 0.14's MagnitudePruningModifier is a training-schedule modifier: under
    `oneshot` it initialises masks but never applies them (checked: 0% sparsity after oneshot), and its mask
    factory rejects N:M structures such as "2:4".
    """
    nm = _nm(pattern)
    for _name, lin in _prunable(model):
        w = lin.weight
        if nm is None:
            k = int(round(sparsity * w.numel()))
            if k == 0:
                continue
            thresh = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= thresh, 0.0)
        else:
            n, m = nm
            if w.shape[1] % m:
                raise MethodFailed("magnitude", "shape", f"{_name}: input width {w.shape[1]} is not a multiple of {m}")
            g = w.view(-1, m)   # groups of M consecutive input weights of one output row
            drop = g.abs().topk(m - n, dim=1, largest=False).indices
            g.scatter_(1, drop, 0.0)


def magnitude(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    model, tok = load_dense(in_dir, ctx.device, "magnitude", trust_remote_code=ctx.trust_remote_code)
    magnitude_prune_(model, params["sparsity"], params["pattern"])
    sp = linear_sparsity(model)
    save_model(model, tok, out_dir, dtype=stored_dtype(in_dir))
    free(model)
    return {"measured_sparsity": round(sp, 4), "libraries": versions("torch", "transformers"),
            "note": "hand-written magnitude pruning (llm-compressor's modifier does not prune under oneshot)"}


# --- wanda / sparsegpt (llm-compressor) --------------------------------------------------------------------------

def _oneshot_prune(method: str, params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model, tok = load_dense(in_dir, ctx.device, method, trust_remote_code=ctx.trust_remote_code)
    prefix, _ = decoder_layers(model)
    targets = [rf"re:{re.escape(prefix)}\.\d+$"]
    nm = params["pattern"] if _nm(params["pattern"]) else "0:0"   # llm-compressor spells "unstructured" as 0:0
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    n, L = params["calib_samples"], params["seq_len"]
    ds = calibration_dataset(tok, ctx.task, n, L, ctx.seed, method, ctx.calib_mix)
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, recipe=[cls(sparsity=params["sparsity"], mask_structure=nm, targets=targets)],
            dataset=ds, num_calibration_samples=n, max_seq_length=L, shuffle_calibration_samples=False)
    secs = time.perf_counter() - t
    sp = linear_sparsity(model)
    # dense save: the zeros are the result (sparse compression is gone from compressed-tensors 0.19)
    save_model(model, tok, out_dir, dtype=stored_dtype(in_dir), save_compressed=False)
    free(model)
    return {"measured_sparsity": round(sp, 4), "oneshot_seconds": round(secs, 3), "targets": targets,
            "calibration": {"samples": n, "seq_len": L, "seed": ctx.seed,
                            **calibration_facts(ctx.task, n, ctx.calib_mix, method)},
            "libraries": versions("llmcompressor", "compressed-tensors", "transformers", "torch")}


def wanda(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return _oneshot_prune("wanda", params, in_dir, out_dir, ctx)


def sparsegpt(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return _oneshot_prune("sparsegpt", params, in_dir, out_dir, ctx)


# --- depth pruning -------------------------------------------------------------------------------------------------
# Hand-written: no installed library removes decoder blocks from a transformers model by measured importance
# (llm-compressor and peft do weight-level work only). The measure is ShortGPT's block influence: 1 - cos(input,
# output) of a block's hidden states, averaged over real tokens; a block that barely turns the residual stream is
# the cheapest to remove.

@torch.no_grad()
def block_importance(model, ids: torch.Tensor, device: str, batch_size: int = 4, ctx: Optional[StepContext] = None
                     ) -> list[float]:
    _, layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    cur_in: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_mod, args, kwargs):
            cur_in[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(_mod, _args, _kwargs, out):
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            cos = torch.nn.functional.cosine_similarity(cur_in[i].float(), h_out.float(), dim=-1)  # (B, T)
            sums[i] += (1.0 - cos).sum().double().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        for b in range(0, ids.shape[0], batch_size):
            x = ids[b:b + batch_size].to(device)
            model(input_ids=x, use_cache=False)
            count += x.numel()
            if ctx is not None:
                report(ctx, "block importance", min(b + batch_size, ids.shape[0]), ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


def block_weight_means(model) -> list[float]:
    _, layers = decoder_layers(model)
    out = []
    for layer in layers:
        tot = n = 0.0
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                tot += m.weight.detach().abs().sum().item()
                n += m.weight.numel()
        out.append(tot / max(n, 1))
    return out


def remove_blocks_(model, drop: list[int]) -> None:
    """Remove blocks in place and make the model consistent: config counts and per-layer lists, and layer_idx of
    the remaining attention modules renumbered (the KV cache is indexed by it; stale indices break generation)."""
    path, layers = decoder_layers(model)
    n = len(layers)
    keep = [i for i in range(n) if i not in set(drop)]
    new = torch.nn.ModuleList([layers[i] for i in keep])
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    setattr(parent, path.rsplit(".", 1)[-1], new)
    for new_idx, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()
                }.values():
        if getattr(cfg, "num_hidden_layers", None) == n:
            cfg.num_hidden_layers = len(keep)
        # per-layer lists (layer_types, sliding-window patterns, ...) follow the kept blocks
        for k, v in list(vars(cfg).items()):
            if isinstance(v, (list, tuple)) and len(v) == n and k != "num_hidden_layers":
                setattr(cfg, k, type(v)(v[i] for i in keep))


def drop_layers(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    model, tok = load_dense(in_dir, ctx.device, "drop_layers", trust_remote_code=ctx.trust_remote_code)
    model.to(ctx.device).eval()
    _, layers = decoder_layers(model)
    n = len(layers)
    by = params["by"]
    count = params.get("count")
    if count is None and params.get("ratio") is not None:
        count = max(1, int(round(params["ratio"] * n)))
    if count is None and by in ("importance", "first", "last"):
        raise MethodFailed("drop_layers", "config", "give 'count' or 'ratio' of blocks to drop")
    extra: dict[str, Any] = {"by": by, "layers_before": n}
    scores: Optional[list[float]] = None
    if by == "importance":
        n_cal = params["calib_samples"]
        ids = calibration_ids(tok, ctx.task, n_cal, params["seq_len"], ctx.seed, "drop_layers", ctx.calib_mix)
        scores = block_importance(model, ids, ctx.device, ctx=ctx)
        extra["importance"] = [round(s, 6) for s in scores]
        extra["importance_measure"] = ("mean over tokens of 1 - cos(block input, block output) on "
                                       f"{ids.shape[0]}x{ids.shape[1]} train-split tokens")
        extra["calibration"] = {"samples": n_cal, "seq_len": params["seq_len"], "seed": ctx.seed,
                                **calibration_facts(ctx.task, n_cal, ctx.calib_mix, "drop_layers")}
        drop = sorted(sorted(range(n), key=lambda i: scores[i])[:count])
    elif by == "first":
        drop = list(range(count))
    elif by == "last":
        drop = list(range(n - count, n))
    elif by == "weight_range":
        lo, hi = params["weight_range"]
        means = block_weight_means(model)
        extra["block_mean_abs_weight"] = [round(x, 6) for x in means]
        drop = [i for i, v in enumerate(means) if lo <= v <= hi]
        if count is not None:
            drop = drop[:count]
    elif by == "explicit":
        drop = sorted(set(params["layers"]))
    else:
        raise MethodFailed("drop_layers", "config", f"unknown selection {by!r}")
    if not drop:
        raise MethodFailed("drop_layers", "config", f"selection by={by} chose no block to drop")
    if len(drop) >= n or any(i < 0 or i >= n for i in drop):
        raise MethodFailed("drop_layers", "shape", f"cannot drop blocks {drop} of a {n}-block model")
    remove_blocks_(model, drop)
    extra.update(dropped_layers=drop, layers_after=n - len(drop))
    save_model(model, tok, out_dir, dtype=stored_dtype(in_dir))
    free(model)
    return extra
