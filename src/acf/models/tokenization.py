"""How text becomes token ids for every teacher-forced and calibration use: one rule, one place.

The rule (SPEC.md, "Tokenization"): a prompt is tokenized without the tokenizer's automatic special tokens, then
the model's BOS is put in front exactly once when the tokenizer would add one itself (`tok("a")` starts with
BOS) and the text does not already begin with it (a chat template that writes `<|begin_of_text|>` already does).
Models trained to always see BOS (Llama 3, Gemma, Mistral base) are otherwise measured on input they never saw.
The target (reference solution, gold answer) follows without special tokens.

A fact of the model's tokenizer, so it lives with the models: the model spec reports it, methods (calibration) and
evaluation (acf.evaluation.sequences: the scored sequences) encode through it.
"""

from __future__ import annotations

from typing import Optional


def _bos_id(tok) -> Optional[int]:
    return getattr(tok, "bos_token_id", None)


def adds_bos(tok) -> bool:
    """Whether the tokenizer itself would start a text with BOS (its own setting, not a guess per family).

    Asked once per tokenizer object and remembered on it (every prompt is encoded through this)."""
    cached = getattr(tok, "_acf_adds_bos", None)
    if cached is None:
        bos = _bos_id(tok)
        probe = tok("a", add_special_tokens=True)["input_ids"] if bos is not None else []
        cached = bool(bos is not None and len(probe) > 0 and probe[0] == bos)
        try:
            tok._acf_adds_bos = cached
        except AttributeError:  # a tokenizer that refuses attributes is simply asked again
            pass
    return cached


def encode_prompt(tok, text: str) -> list[int]:
    """Token ids of a prompt: the text's own tokens, with BOS in front exactly once where the model expects it."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if adds_bos(tok):
        bos = _bos_id(tok)
        if not ids or ids[0] != bos:
            ids = [bos] + ids
    return ids


def prompt_text(tok, text: str) -> str:
    """The same rule for code paths that tokenize strings in batches (generation): BOS text in front where needed."""
    if adds_bos(tok) and tok.bos_token and not text.startswith(tok.bos_token):
        return tok.bos_token + text
    return text


def encode_target(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def cut_left(ids: list, keep: int, bos_id: Optional[int]) -> list:
    """The last `keep` tokens of a prompt, cut from the left (the question's end matters most) without losing the
    BOS it started with: a model trained to always see BOS keeps seeing exactly one."""
    keep = max(0, min(len(ids), keep))
    if keep == len(ids):
        return list(ids)
    if bos_id is not None and ids and ids[0] == bos_id and keep > 0:
        return [bos_id] + list(ids[len(ids) - keep + 1:])
    return list(ids[len(ids) - keep:])
