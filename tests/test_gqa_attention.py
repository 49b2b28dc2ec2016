"""Grouped-query attention folded into the query axis: the same logits and the same greedy text as transformers'
sdpa path under a padding mask, without per-head KV copies; opt-in per call, restored afterwards."""

from __future__ import annotations

import pytest
import torch


def _spy_sdpa(monkeypatch) -> list[tuple[int, int]]:
    """(query heads, key heads) of every SDPA call."""
    seen: list[tuple[int, int]] = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[1], k.shape[1]))
        return orig(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_folded_attention_equals_sdpa_under_padding(tiny_model_dir, monkeypatch):
    from acf.evaluation.gqa_attention import ATTN, use_for_generation
    from acf.models.loading import load_model

    model, _ = load_model(tiny_model_dir, "cpu", dtype="float32")
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 2
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (3, 14))
    am = torch.ones_like(ids)
    am[0, :6] = 0
    am[2, :3] = 0                                   # left padding: every attention call carries a mask
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=am).logits
        assert use_for_generation(model) == "sdpa" and model.config._attn_implementation == ATTN
        seen = _spy_sdpa(monkeypatch)
        got = model(input_ids=ids, attention_mask=am).logits
    assert seen and all(qh == kh == 2 for qh, kh in seen)           # one call per KV head group: nothing repeated
    keep = am.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)


PROMPTS = ["Question: 2 + 3 = ?\nAnswer:", "Q: a much longer question about apples and pears, to pad the other "
           "rows of the batch on the left\nA:", "Hello"]


def generate_without_and_with_fold(model, tok, monkeypatch, new: int = 12):
    """(texts, engine) of acf's padded generation with ACF_GQA_FOLD=0, then =1, on PROMPTS in one batch."""
    from acf.evaluation.generate import generate_all

    out = []
    for fold in ("0", "1"):
        monkeypatch.setenv("ACF_GQA_FOLD", fold)
        out.append(generate_all(model, tok, PROMPTS, new, batch_size=len(PROMPTS)))
    return out


def test_generate_all_same_text_and_restores_sdpa(tiny_model_dir, monkeypatch):
    from acf.models.loading import load_model

    model, tok = load_model(tiny_model_dir, "cpu", dtype="float32")
    (before, how0), (after, how1) = generate_without_and_with_fold(model, tok, monkeypatch)
    assert after == before and all(n > 0 for _, n in after)
    assert "folded" in how1 and "folded" not in how0
    assert model.config._attn_implementation == "sdpa"               # training and scoring keep the stock path


def test_not_applied_without_grouped_heads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from acf.evaluation.gqa_attention import use_for_generation

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    assert use_for_generation(model) is None and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("q_len", [1, 5])
def test_fold_matches_repeat_kv_directly(q_len):
    """The function alone against repeat_kv + SDPA, decode (1 query) and prefill (5), float and bool masks."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from acf.evaluation.gqa_attention import gqa_sdpa_forward

    class M(torch.nn.Module):
        num_key_value_groups = 3

    torch.manual_seed(1)
    b, hkv, d, L = 2, 2, 8, 7
    q = torch.randn(b, hkv * 3, q_len, d)
    k, v = torch.randn(b, hkv, L, d), torch.randn(b, hkv, L, d)
    allowed = torch.ones(b, 1, q_len, L, dtype=torch.bool)
    allowed[0, :, :, :2] = False
    for mask in (allowed, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))):
        want = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask)
        got, _ = gqa_sdpa_forward(M(), q, k, v, mask, scaling=None)
        torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_generation_excludes_cudnn_attention_only_inside_its_context():
    """cuDNN's attention builds a plan per new key length (every decode step): the padded engine runs without it
    on a GPU, and the switch is scoped, so training and scoring keep torch's own choice."""
    import torch

    from acf.evaluation.generate import _sdpa_without_cudnn

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with _sdpa_without_cudnn():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
