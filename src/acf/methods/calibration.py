"""Calibration and training data, drawn from train splits only (never fixed sentences, never a test split).

Calibration statistics (GPTQ Hessians, AWQ scales, Wanda norms, block importance) should reflect the text the
compressed model will see, and must never touch the test split that evaluation scores. Texts are packed: train
texts are tokenized, joined with EOS and cut into `seq_len`-token windows, so every sample carries a full
`seq_len` tokens even when single GSM8K items are short (~150 tokens).

By default every window comes from the run's task. A `general` share (the step context's `calib_mix`) draws that
share of windows (and of kd_tune's examples) from general text instead: the other tasks' train splits
(`acf.evaluation.general_text.general_train_texts`), so statistics fitted on the task alone do not trade away the
model's behaviour on other text (what kld_general measures). Task and general windows are packed separately (a
window is all-task or all-general) and then spread evenly through the batch.

With `--calib-data FILE` the step context's task is an `acf.tasks.calib_text.CalibTextTask`: the task part's
windows (and training examples) come from the file's texts instead of the task's train split, as plain text; the
general share is drawn as before. Records name the file (`calibration_facts`) and caches key on its digest
(`calibration_name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from acf.core.errors import DataError, MethodFailed
from acf.evaluation.general_text import general_train_pool, general_train_texts
from acf.evaluation.sequences import task_sequences
from acf.models.tokenization import cut_left, encode_prompt

# Average tokens per GSM8K train text is ~150; start with a guess and double until enough tokens are packed.
_GUESS_TOKENS_PER_TEXT = 120


def _require_task(task: Any, method: str) -> None:
    if task is None or not hasattr(task, "train_texts"):
        raise MethodFailed(method, "config", "this method needs a task (calibration/training text comes from its "
                                             "train split), but the step context has none")


def general_count(n: int, general: float, method: str = "calibration") -> int:
    """How many of `n` windows/examples come from general text: `general * n` rounded half up (so a share of 0.5
    of one window is that window, and 0 is always none). A share outside 0..1 is a configuration error."""
    if not 0.0 <= general <= 1.0:
        raise MethodFailed(method, "config", f"calib_mix (share of general calibration text) must be in 0..1, "
                                             f"got {general}")
    return int(math.floor(n * general + 0.5))


def mix_order(n_task: int, n_general: int) -> list[bool]:
    """Which positions of the `n_task + n_general` samples are general (True): spread evenly (Bresenham), so a
    batch or a prefix of the samples holds about the same share as the whole. Deterministic; no general positions
    when n_general is 0."""
    n = n_task + n_general
    return [(i + 1) * n_general // n > i * n_general // n for i in range(n)]


def interleave(task_part: list, general_part: list) -> list:
    """The two parts merged in `mix_order`, each part keeping its own order."""
    it_t, it_g = iter(task_part), iter(general_part)
    return [next(it_g) if g else next(it_t) for g in mix_order(len(task_part), len(general_part))]


def calibration_ids(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "calibration",
                    general: float = 0.0) -> torch.Tensor:
    """`n` packed windows of exactly `seq_len` token ids, shape (n, seq_len): `general_count(n, general)` of them
    from general text (other tasks' train splits), the rest from the task's train texts; `general=0` gives
    exactly the task-only windows (existing caches key on them).

    Deterministic for (task, n, seq_len, seed, general): both sources are prefix-stable in the number of texts.
    """
    _require_task(task, method)
    n_gen = general_count(n, general, method)
    eos = tokenizer.eos_token_id
    task_part = _pack(lambda k: _train_token_texts(tokenizer, task, k, seed), eos, n - n_gen, seq_len, method,
                      task_source(task)) if n_gen < n or n_gen == 0 else None
    if n_gen == 0:
        return task_part
    gen_part = _pack(lambda k: _general_token_texts(tokenizer, task, k, seed, method), eos, n_gen, seq_len, method,
                     "the general calibration text")
    if task_part is None:
        return gen_part
    return torch.stack(interleave(list(task_part), list(gen_part)))


def task_source(task: Any) -> str:
    """The task part's source in words: the task's train split, or the user's `--calib-data` file
    (acf.tasks.calib_text.CalibTextTask)."""
    return getattr(task, "calib_source", None) or "the task's train split"


def calibration_name(task: Any) -> str:
    """The task part's identity in caches keyed on calibration text (sensitivity passes): the task's name, or the
    name with the `--calib-data` file's digest, so a pass calibrated on other text is never reused."""
    return getattr(task, "calib_key", None) or getattr(task, "name", "task")


def _pack(fetch: Callable[[int], list[list[int]]], eos: Optional[int], n: int, seq_len: int, method: str,
          what: str) -> torch.Tensor:
    """`n` windows of `seq_len` ids from the texts `fetch(k)` gives (prefix-stable in k), joined with EOS; asks
    for twice as many texts until enough tokens are packed or the source is exhausted."""
    need = n * seq_len
    k = max(8, need // _GUESS_TOKENS_PER_TEXT + 1)
    prev_k = -1
    while True:
        texts = fetch(k)
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
            raise MethodFailed(method, "data", f"{what} has only {len(stream)} tokens; "
                                               f"seq_len {seq_len} is too long")
        raise MethodFailed(method, "data", f"{what} holds {len(stream)} tokens: enough for {have} "
                                           f"samples of {seq_len}, not {n}; lower calib_samples or seq_len")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len)


def check_supply(tokenizer, task: Any, n: int, seq_len: int, general: float) -> None:
    """Refuse, before a run spends anything, a calibration its data cannot fill (every calibrated episode and
    recipe would otherwise fail alike): packs the windows once, as the steps will (seconds), and turns a shortage
    into one DataError that names the settings to change. Seen: 128 windows of 512 with the default share 0.25
    need 16,384 general tokens on a GSM8K run; the shipped general train text holds about 10,800."""
    try:
        calibration_ids(tokenizer, task, n, seq_len, 0, "calibration", general)
    except MethodFailed as e:
        hint = (f"; or lower --calib-mix (now {general})" if general > 0 and "general" in e.reason else "")
        if getattr(task, "calib_source", None) and "general" not in e.reason:
            hint += "; or add text to the --calib-data file"
        raise DataError(f"calibration ({n} samples of {seq_len} tokens, {general:.0%} general text) cannot be "
                        f"filled: {e.reason}{hint}") from None


def general_texts_for(task: Any, k: int, seed: int, method: str) -> list[str]:
    """The first `k` general calibration texts for a run of `task` (never the task's own data); no source
    available is this method's data failure, not a silent fall back to task-only calibration."""
    try:
        return general_train_texts(getattr(task, "name", ""), k, seed)
    except DataError as e:
        raise MethodFailed(method, "data", f"calib_mix > 0 needs general text: {e}") from None


def _general_token_texts(tokenizer, task: Any, k: int, seed: int, method: str) -> list[list[int]]:
    """General texts as token ids: plain text (no chat template), as kld_general scores it."""
    return [encode_prompt(tokenizer, t) for t in general_texts_for(task, k, seed, method)]


def calibration_facts(task: Any, n: int, general: float, method: str = "calibration", task_note: str = ""
                      ) -> dict[str, Any]:
    """What a step's record says of its calibration text: the source in words (`task_note` follows the task's
    part, e.g. its prompt format), the requested general share and how many of the `n` samples it gave.
    Task-only calibration reads as before ("gsm8k train split"); text from a `--calib-data` file is named by the
    file's name and digest prefix (its texts are plain text, so `task_note` about the prompt format does not apply).
    """
    name = getattr(task, "name", "task")
    n_gen = general_count(n, general, method)
    own = getattr(task, "calib_source", None)
    facts: dict[str, Any] = {"source": own or f"{name} train split{task_note}", "general_share": general,
                             "general_samples": n_gen}
    if own:
        facts["calib_data"] = {"file": task.calib.path.name, "sha256": task.calib.sha256}
    if n_gen:
        used = general_train_pool(name, 0)[1]
        facts["source"] += f" + {n_gen / n:.0%} general text ({', '.join(used)} train)"
        facts["general_sources"] = used
    return facts


def _train_token_texts(tokenizer, task: Any, k: int, seed: int) -> list[list[int]]:
    """Train-split texts as token ids, in the prompt format evaluation uses: a task with (prompt, reference) pairs
    is rendered as evaluation renders it (chat template, BOS rule) followed by its reference, so calibration
    statistics see the text the compressed model will see; other tasks give their plain train texts."""
    if hasattr(task, "train_pairs"):
        return [list(s.prompt + s.target) for s in task_sequences(task, tokenizer, task.train_pairs(k, seed=seed))]
    return [encode_prompt(tokenizer, t) for t in task.train_texts(k, seed=seed)]


def calibration_dataset(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "calibration",
                        general: float = 0.0):
    """The same windows as a `datasets.Dataset` of input_ids/attention_mask: the form llmcompressor's `oneshot`
    takes as already tokenized (it skips its own tokenization when `input_ids` is present)."""
    from datasets import Dataset

    ids = calibration_ids(tokenizer, task, n, seq_len, seed, method, general)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


@dataclass
class TrainExample:
    input_ids: list[int]
    labels: list[int]          # -100 where no loss is taken (the prompt)


def training_examples(tokenizer, task: Any, n: int, seq_len: int, seed: int = 0, method: str = "train",
                      general: float = 0.0) -> list[TrainExample]:
    """Recovery-training examples from the task's train split, truncated to `seq_len` tokens.

    When the task offers `train_pairs` (prompt + reference solution), the prompt is rendered exactly as
    evaluation renders it (`task.chat_prompt`) and the loss is taken on the solution tokens (+EOS) only:
    the model is taught to answer, not to reproduce questions. Otherwise the whole train text is the target.
    A `general` share (kd_tune's calib_mix; LoRA and distillation adapt to the task and keep 0) takes
    `general_count(n, general)` of the examples from general text, whole text as target, spread evenly among
    the task's; `general=0` gives exactly the task-only examples.
    """
    _require_task(task, method)
    n_gen = general_count(n, general, method)
    out: list[TrainExample] = []
    if n_gen < n or n_gen == 0:
        out = _task_examples(tokenizer, task, n - n_gen, seq_len, seed)
        if not out:
            raise MethodFailed(method, "data", f"{task_source(task)} gave no training examples")
    if n_gen:
        gen = _text_examples(tokenizer, general_texts_for(task, n_gen, seed, method), seq_len)
        if not gen:
            raise MethodFailed(method, "data", "the general text gave no training examples")
        out = interleave(out, gen)
    return out


def _task_examples(tokenizer, task: Any, n: int, seq_len: int, seed: int) -> list[TrainExample]:
    if not hasattr(task, "train_pairs"):
        return _text_examples(tokenizer, task.train_texts(n, seed=seed), seq_len)
    out: list[TrainExample] = []
    for sq in task_sequences(task, tokenizer, task.train_pairs(n, seed=seed)):
        p, r = list(sq.prompt), list(sq.target)
        # Long prompts are cut from the left (the question's end and the answer matter most), keeping at
        # least half the window for the solution so truncation never leaves an example without targets.
        p = cut_left(p, max(seq_len - len(r), seq_len // 2), tokenizer.bos_token_id)
        ids = (p + r)[:seq_len]
        labels = ([-100] * len(p) + r)[:seq_len]
        if any(x != -100 for x in labels[1:]):
            out.append(TrainExample(ids, labels))
    return out


def _text_examples(tokenizer, texts: list[str], seq_len: int) -> list[TrainExample]:
    """Plain texts (+EOS) as examples whose whole text is the target."""
    eos = tokenizer.eos_token or ""
    eos_ids = tokenizer(eos, add_special_tokens=False)["input_ids"]
    out: list[TrainExample] = []
    for t in texts:
        ids = (encode_prompt(tokenizer, t) + eos_ids)[:seq_len]
        if len(ids) > 1:
            out.append(TrainExample(ids, list(ids)))
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
