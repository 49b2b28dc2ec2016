"""Calibration and training data, always drawn from the task's train split (never fixed sentences).

Calibration statistics (GPTQ Hessians, AWQ scales, Wanda norms, block importance) should reflect the text the
compressed model will see, and must never touch the test split that evaluation scores. Texts are packed: train
texts are tokenized, joined with EOS and cut into `seq_len`-token windows, so every sample carries a full
`seq_len` tokens even when single GSM8K items are short (~150 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from acf.core.errors import MethodFailed

# Average tokens per GSM8K train text is ~150; start with a guess and double until enough tokens are packed.
_GUESS_TOKENS_PER_TEXT = 120


def _require_task(task: Any, method: str) -> None:
    if task is None or not hasattr(task, "train_texts"):
        raise MethodFailed(method, "config", "this method needs a task (calibration/training text comes from its "
                                             "train split), but the step context has none")


def calibration_ids(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "calibration"
                    ) -> torch.Tensor:
    """`n` packed windows of exactly `seq_len` token ids from the task's train texts, shape (n, seq_len).

    Deterministic for (task, n, seq_len, seed): the task's `train_texts(k, seed)` is prefix-stable in k.
    """
    _require_task(task, method)
    need = n * seq_len
    eos = tokenizer.eos_token_id
    k = max(8, need // _GUESS_TOKENS_PER_TEXT + 1)
    prev_k = -1
    while True:
        texts = _train_token_texts(tokenizer, task, k, seed)
        stream: list[int] = []
        for ids in texts:
            stream.extend(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                stream.append(eos)
            if len(stream) >= need:
                break
        if len(stream) >= need or len(texts) <= prev_k or len(texts) < k:
            break
        prev_k, k = len(texts), k * 2
    if len(stream) < need:
        have = len(stream) // seq_len
        if have == 0:
            raise MethodFailed(method, "data", f"the task's train split has only {len(stream)} tokens; "
                                               f"seq_len {seq_len} is too long")
        raise MethodFailed(method, "data", f"the task's train split holds {len(stream)} tokens: enough for {have} "
                                           f"samples of {seq_len}, not {n}; lower calib_samples or seq_len")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)


def _train_token_texts(tokenizer, task: Any, k: int, seed: int) -> list[list[int]]:
    """Train-split texts as token ids, in the prompt format evaluation uses: a task with (prompt, reference) pairs
    is rendered as evaluation renders it (chat template, BOS rule) followed by its reference, so calibration
    statistics see the text the compressed model will see; other tasks give their plain train texts."""
    from acf.evaluation.sequences import cut_left, encode_prompt, task_sequences

    if hasattr(task, "train_pairs"):
        return [list(s.prompt + s.target) for s in task_sequences(task, tokenizer, task.train_pairs(k, seed=seed))]
    return [encode_prompt(tokenizer, t) for t in task.train_texts(k, seed=seed)]


def calibration_dataset(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "calibration"):
    """The same windows as a `datasets.Dataset` of input_ids/attention_mask: the form llmcompressor's `oneshot`
    takes as already tokenized (it skips its own tokenization when `input_ids` is present)."""
    from datasets import Dataset

    ids = calibration_ids(tokenizer, task, n, seq_len, seed, method)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]          # -100 where no loss is taken (the prompt)


def training_examples(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "train"
                      ) -> list[TrainExample]:
    """Recovery-training examples from the task's train split, truncated to `seq_len` tokens.

    When the task offers `train_pairs` (prompt + reference solution), the prompt is rendered exactly as
    evaluation renders it (`task.chat_prompt`) and the loss is taken on the solution tokens (+EOS) only:
    the model is taught to answer, not to reproduce questions. Otherwise the whole train text is the target.
    """
    from acf.evaluation.sequences import cut_left, encode_prompt, task_sequences

    _require_task(task, method)
    eos = tokenizer.eos_token or ""
    out: list[TrainExample] = []
    if hasattr(task, "train_pairs"):
        for sq in task_sequences(task, tokenizer, task.train_pairs(n, seed=seed)):
            p, r = list(sq.prompt), list(sq.target)
            # Long prompts are cut from the left (the question's end and the answer matter most), keeping at
            # least half the window for the solution so truncation never leaves an example without targets.
            p = cut_left(p, max(seq_len - len(r), seq_len // 2), tokenizer.bos_token_id)
            ids = (p + r)[:seq_len]
            labels = ([-100] * len(p) + r)[:seq_len]
            if any(x != -100 for x in labels[1:]):
                out.append(TrainExample(ids, labels))
    else:
        for t in task.train_texts(n, seed=seed):
            ids = (encode_prompt(tokenizer, t) + tokenizer(eos, add_special_tokens=False)["input_ids"])[:seq_len]
            if len(ids) > 1:
                out.append(TrainExample(ids, list(ids)))
    if not out:
        raise MethodFailed(method, "data", "the task's train split gave no training examples")
    return out


def collate(batch: list[TrainExample], pad_id: int, device: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    L = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), L), dtype=torch.long)
    lab = torch.full((len(batch), L), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        lab[i, :n] = torch.tensor(e.labels)
    d = {"input_ids": ids, "attention_mask": att, "labels": lab}
    return {k: v.to(device) for k, v in d.items()} if device else d


def batch_stream(examples: list[TrainExample], batch_size: int, steps: int, seed: int = 0):
    """`steps` batches, cycling through shuffled epochs deterministically."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(len(examples), generator=g).tolist()
            batch.append(examples[order.pop()])
        yield batch
