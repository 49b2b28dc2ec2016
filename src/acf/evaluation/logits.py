"""Teacher-forced next-token logits in chunks of positions, so memory stays bounded for any vocabulary size.

Why: a plain forward materialises logits of shape (batch, sequence, vocabulary), and scoring needs them in float32.
With Gemma's 262k vocabulary, 8 sequences of 512 tokens are 4.3 GB of float32 logits (plus the model-dtype copy
and the log-softmax workspace), for a metric that keeps one number per position. Here the model's decoder runs
once per batch (hidden states: batch x sequence x hidden, small), and the output head is applied to at most
`chunk_positions(vocab)` positions at a time, so the float32 logits held at once stay under `CHUNK_ELEMENTS`
values whatever the vocabulary.

The head is the model's own output embedding plus the post-processing transformers applies after it for the
families acf supports (Gemma 2/3's final logit soft-capping, Granite's `logits_scaling`, Cohere's `logit_scale`).
Before a model is scored this way, the chunked head is checked once against the model's own forward on a short
input; a model whose forward does something else after the head (the check fails, or it has no separate decoder
and head) is scored from its own full logits, still log-softmaxed in chunks, and a warning names it, so the
numbers are right even where the memory bound cannot be kept.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable, Iterator, Optional, Sequence

import torch

log = logging.getLogger(__name__)

#: float32 logit values one chunk may hold: 2^24 = 64 MiB (65 positions of a 256k vocabulary, 341 of SmolLM2's 49k)
CHUNK_ELEMENTS = 1 << 24
#: tokens of the one-off check of the chunked head against the model's own forward
CHECK_TOKENS = 8

Head = Callable[[torch.Tensor], torch.Tensor]


def chunk_positions(vocab: int, elements: Optional[int] = None) -> int:
    """Positions per chunk so that positions x vocab float32 logits stay within `elements` (CHUNK_ELEMENTS)."""
    return max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))


def _post(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to the head's output before returning logits (see the module docstring)."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    cap = getattr(text_cfg, "final_logit_softcapping", None)
    scaling = getattr(text_cfg, "logits_scaling", None)
    scale = getattr(model, "logit_scale", None)

    def post(x: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)):
            x = x * scale
        if scaling:
            x = x / scaling
        if cap:
            x = torch.tanh(x / cap) * cap
        return x

    return post


def _decoder_and_head(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if dec is None or head is None or dec is model:
        return None
    return dec, head


#: the verdict of `_check` per model object (weak: a copy of a model, e.g. a perturbed deepcopy, is checked anew,
#: and nothing keeps a freed model alive)
_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
#: model classes already warned about (acf.evaluation.logits.chunked_head)
_WARNED: set[str] = set()


def chunked_head(model) -> Optional[tuple[torch.nn.Module, Head]]:
    """(decoder, head) where the model's logits equal head(decoder(...).last_hidden_state); None where they do not
    (then the caller uses the model's own forward). Checked once per model object."""
    parts = _decoder_and_head(model)
    if parts is None:
        if _VERDICTS.get(model) is None:
            # once per kind of model, not per candidate (every GGUF candidate is a new LlamaCppLM)
            if type(model).__name__ not in _WARNED:
                _WARNED.add(type(model).__name__)
                log.warning("%s has no separate decoder and output head: its logits are computed whole (memory "
                            "grows with batch x sequence x vocabulary)", type(model).__name__)
            _VERDICTS[model] = False
        return None
    dec, head_mod = parts
    post = _post(model)
    hdev = next(head_mod.parameters()).device

    def head(h: torch.Tensor) -> torch.Tensor:
        return post(head_mod(h.to(hdev))).float()

    ok = _VERDICTS.get(model)
    if ok is None:
        problem = _check(model, dec, head)
        ok = problem is None
        if not ok:
            log.warning("%s: the chunked output head does not reproduce the model's logits (%s); its logits are "
                        "computed whole (memory grows with batch x sequence x vocabulary)", type(model).__name__,
                        problem)
        _VERDICTS[model] = ok
    return (dec, head) if ok else None


def vocab_size(model) -> int:
    """Rows of the output head (the logits' last dimension), from the head itself where it says."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(getattr(head, "out_features", 0) or model.config.get_text_config().vocab_size)


def _check(model, dec, head: Head) -> Optional[str]:
    """None when head(decoder(x)) equals the model's own logits on a short input, else what differs."""
    device = next(model.parameters()).device
    vocab = vocab_size(model)
    ids = (torch.arange(CHECK_TOKENS, device=device) * 7919 % max(vocab, 1)).unsqueeze(0)
    att = torch.ones_like(ids)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=att, use_cache=False).logits.float()
        got = head(dec(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state).to(want.device)
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = float((got - want).abs().max())
    tol = 1e-3 * (1.0 + float(want.abs().max()))
    return None if diff <= tol else f"max difference {diff:.3g} > {tol:.3g}"


def scored_logits(model, ids: torch.Tensor, att: torch.Tensor, spans: Sequence[tuple[int, int]],
                  elements: Optional[int] = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """For each row r with span (start, n): yield (r, offset, float32 logits [m, vocab]) for positions
    start+offset .. start+offset+m-1, in chunks of at most `chunk_positions(vocab, elements)` positions.

    One forward of the batch; logits at position t predict token t+1."""
    with torch.inference_mode():
        parts = chunked_head(model)
        if parts is not None:
            dec, head = parts
            hidden = dec(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
            step = chunk_positions(vocab_size(model), elements)
            for r, (start, n) in enumerate(spans):
                for a in range(0, n, step):
                    yield r, a, head(hidden[r, start + a:start + min(n, a + step)])
            del hidden
            return
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        step = chunk_positions(int(logits.shape[-1]), elements)
        for r, (start, n) in enumerate(spans):
            for a in range(0, n, step):
                yield r, a, logits[r, start + a:start + min(n, a + step)].float()
        del logits
