"""How text becomes token ids for every teacher-forced and calibration use: one rule, one place.

The rule (SPEC.md, "Tokenization"): a prompt is tokenized without the tokenizer's automatic special tokens, then
the model's BOS is put in front exactly once when the tokenizer would add one itself (`tok("a")` starts with
BOS) and the text does not already begin with it (a chat template that writes `<|begin_of_text|>` already does).
Models trained to always see BOS (Llama 3, Gemma, Mistral base) are otherwise measured on input they never saw.
The target (reference solution, gold answer) follows without special tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence


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


@dataclass(frozen=True)
class Scored:
    """One teacher-forced sequence: `prompt` ids then `target` ids; the target tokens are the scored positions."""

    id: str
    prompt: tuple[int, ...]
    target: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.target)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(str(len(self.prompt)).encode())
        h.update(b"|")
        h.update(",".join(map(str, self.prompt + self.target)).encode())
        return h.hexdigest()[:16]


def cut_left(ids: list, keep: int, bos_id: Optional[int]) -> list:
    """The last `keep` tokens of a prompt, cut from the left (the question's end matters most) without losing the
    BOS it started with: a model trained to always see BOS keeps seeing exactly one."""
    keep = max(0, min(len(ids), keep))
    if keep == len(ids):
        return list(ids)
    if bos_id is not None and ids and ids[0] == bos_id and keep > 0:
        return [bos_id] + list(ids[len(ids) - keep + 1:])
    return list(ids[len(ids) - keep:])


def task_sequences(task, tok, items: Sequence, fewshot: int = 0, max_len: Optional[int] = None) -> list[Scored]:
    """prompt (as evaluation renders it) + reference (+EOS zero-shot) for each item: what answer NLL and kld score."""
    eos = tok.eos_token or ""
    out = []
    for it in items:
        p = encode_prompt(tok, task.chat_prompt(it, tok, fewshot))
        r = encode_target(tok, it.reference + (eos if fewshot == 0 else ""))
        if max_len is not None and len(p) + len(r) > max_len:
            p = cut_left(p, max(max_len - len(r), max_len // 2), tok.bos_token_id)
            r = r[:max_len - len(p)]
        out.append(Scored(id=str(it.id), prompt=tuple(p), target=tuple(r)))
    return out


def text_sequences(texts: Iterable[tuple[str, str]], tok, max_len: int = 256) -> list[Scored]:
    """Plain texts (id, text) scored on every token after the first (the first has nothing to condition on)."""
    out = []
    for tid, text in texts:
        ids = encode_prompt(tok, text)[:max_len]
        if len(ids) < 2:
            continue
        out.append(Scored(id=tid, prompt=tuple(ids[:1]), target=tuple(ids[1:])))
    return out
