"""Evaluation batch sizes chosen from the GPU's free memory instead of a fixed number.

Why: on a GPU a small model's generation is bound by per-step Python/kernel-launch overhead, not by compute, so
the number of decode steps decides the wall time. With a fixed batch of 256, the 1319 GSM8K test items need 6
batches of up to 256 steps each; one batch of 1319 needs 256 steps in all (measured before/after figures:
experiments/bench_gpu_batch.py). The size is bounded by what each sequence needs in memory (KV cache for
generation, full-sequence logits for teacher-forced scoring), so large models get small batches.
On CPU a fixed small batch stays best (compute bound, and RSS is shared with everything else).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Union

CPU_BATCH = 8
MAX_BATCH = 2048
#: share of the currently free GPU memory an evaluation batch may plan to use (the rest covers activations,
#: allocator fragmentation and the dequantisation buffers of compressed models)
MEMORY_SHARE = 0.4


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """KV-cache bytes one token occupies across all layers (keys and values)."""
    layers = getattr(config, "num_hidden_layers", None) or 1
    heads = getattr(config, "num_attention_heads", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // max(heads, 1))
    return int(layers * 2 * kv_heads * head_dim * dtype_bytes)


def per_sequence_bytes(config, kind: Literal["generate", "score"], seq_len: int, dtype_bytes: int = 2,
                       new_tokens: int = 0) -> int:
    """Memory one sequence of `seq_len` tokens needs beyond the weights.

    generate: the larger of its whole KV cache (the last decode step) and the prompt's KV cache plus one layer's
    activations over the prompt (the prefill), the prompt being `seq_len - new_tokens` tokens (`new_tokens` 0:
    the sum over all `seq_len` tokens, an upper bound). Measured at Llama-3.1-8B shape on an H100, 400 GSM8K
    prompts of up to 188 tokens + 256 new: 22.2 GiB above the weights, against 21.7 GiB by this estimate (the
    earlier sum over all tokens said 36.6 GiB and held the batch to 221; experiments/results/gen-backends-h100.json).
    score: full-sequence logits (model dtype and the float32 copy the loss is computed on) plus the KV/hidden
    states of the forward.
    """
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", 0) or 4 * hidden
    kv_tok = kv_bytes_per_token(config, dtype_bytes)
    act_tok = (hidden * 4 + inter * 2) * dtype_bytes   # largest transient activations of one layer, per token
    if kind == "generate":
        if new_tokens <= 0:
            return (kv_tok + act_tok) * seq_len
        return max(kv_tok * seq_len, (kv_tok + act_tok) * max(seq_len - new_tokens, 1))
    kv = kv_tok * seq_len
    act = act_tok * seq_len
    vocab = getattr(config, "vocab_size", 0) or 0
    return kv + act + seq_len * vocab * (dtype_bytes + 4 + 4)   # logits, float copy, per-token loss workspace


def auto_batch_size(model, n_items: int, kind: Literal["generate", "score"], seq_len: Union[int, Callable[[], int]],
                    free_bytes: Optional[int] = None, new_tokens: int = 0) -> int:
    """Largest batch (≤ n_items, ≤ MAX_BATCH) whose planned memory fits MEMORY_SHARE of the free GPU memory.

    `seq_len` may be a callable, evaluated only on a GPU (measuring it means tokenizing every prompt); for
    generation it counts prompt and `new_tokens` together."""
    import torch

    param = next(model.parameters())
    if param.device.type != "cuda":
        return max(1, min(CPU_BATCH, n_items))
    if free_bytes is None:
        # memory the caching allocator holds but no tensor uses is free for us too (mem_get_info does not count it)
        free_bytes, _ = torch.cuda.mem_get_info(param.device)
        free_bytes += torch.cuda.memory_reserved(param.device) - torch.cuda.memory_allocated(param.device)
    dtype_bytes = param.element_size() if param.dtype.is_floating_point else 2
    tokens = seq_len() if callable(seq_len) else seq_len
    per = max(1, per_sequence_bytes(model.config, kind, max(tokens, 1), dtype_bytes, new_tokens=new_tokens))
    return int(max(1, min(n_items, MAX_BATCH, (free_bytes * MEMORY_SHARE) // per)))
