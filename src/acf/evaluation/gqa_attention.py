"""Grouped-query attention under a padding mask without copying keys and values per query head.

Why: batched evaluation pads prompts on the left, so every attention call carries a mask. transformers 5.17's
`sdpa` path then cannot pass `enable_gqa` to torch (its `use_gqa_in_sdpa` requires no mask) and calls `repeat_kv`,
which materialises keys and values once per query head: for Llama-3.1-8B (32 query heads over 8 KV heads) each
decode step writes and reads 4x the whole KV cache, the largest memory traffic of a large-batch decode step.

Here the query heads that share a KV head are folded into the query-length axis instead: queries (B, Hkv*G, q, D)
become (B, Hkv, G*q, D), the mask (B, 1, q, L) is broadcast to (B, 1, G*q, L), and one SDPA call attends each KV head
once. The result is the same attention (same softmax over the same keys, per query row), reordered back.

Hand-written because no installed library offers it: flash-attn (native GQA with padding) is not a dependency and
is not on the lent GPU image; `flex_attention` compiles per shape; torch's `enable_gqa` with a mask dispatches to
the math kernel, which expands keys and values itself. Registered under its own name (`ATTN`), so models opt in
per load and training keeps the stock `sdpa`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

ATTN = "acf_sdpa_gqa"
_registered = False


def gqa_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                     is_causal: Optional[bool] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature; falls back to the stock `sdpa` wherever folding does not apply
    (no mask: the stock path already uses native GQA; no grouping; dropout; a position bias; odd mask shapes)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    b, h, q, d = query.shape
    if (groups <= 1 or attention_mask is None or dropout or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions") or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or attention_mask.shape[-2] != q or attention_mask.shape[-1] != key.shape[-2]
            or key.shape[1] * groups != h):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    hkv = key.shape[1]
    # query head j*G + g uses KV head j (repeat_kv's order): (B, Hkv, G, q, D) -> (B, Hkv, G*q, D)
    qf = query.reshape(b, hkv, groups * q, d)
    mb = attention_mask.shape[0]
    mask = attention_mask.unsqueeze(2).expand(mb, 1, groups, q, attention_mask.shape[-1])
    mask = mask.reshape(mb, 1, groups * q, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(qf, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(b, h, q, d).transpose(1, 2).contiguous()
    return out, None


def register() -> str:
    """Make `ATTN` a valid `attn_implementation` (attention function and its mask builder, the sdpa one)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN, gqa_sdpa_forward)
        AttentionMaskInterface.register(ATTN, sdpa_mask)
        _registered = True
    return ATTN


def use_for_generation(model) -> Optional[str]:
    """Switch a loaded model that uses `sdpa` with grouped KV heads to the folded path; returns the previous
    implementation (to restore) or None when nothing was changed."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    prev = getattr(cfg, "_attn_implementation", None)
    if cfg is None or not heads or kv == heads or prev != "sdpa":
        return None
    try:
        model.set_attn_implementation(register())
    except Exception as e:  # noqa: BLE001 - an architecture that takes no custom attention keeps its sdpa path
        log.info("grouped-query folding not applied (%s: %s); generating with sdpa", type(e).__name__, e)
        return None
    return prev
