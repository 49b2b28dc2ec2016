"""The teacher-forced sequences evaluation scores (answer NLL, kld) and calibration reads: prompt ids then target ids,
encoded by the one tokenization rule (acf.models.tokenization, SPEC.md "Tokenization")."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from acf.models.tokenization import cut_left, encode_prompt, encode_target


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
