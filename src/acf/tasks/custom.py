"""Your own data as a task (`acf run --dataset FILE`): everything acf measures without a task-specific scorer
(kld, top1, kld_general, answer NLL of the reference response, calibration and recovery text) works on it exactly
as on the built-in tasks, because it is the same `Task` interface: items with a prompt and a reference, a prompt
rendered with the model's chat template, train items for calibration.

Reading and the train/test split are in `acf.tasks.own_data`. An optional `--scorer` adds generation accuracy:
`exact` (the whole completion equals the reference, whitespace collapsed) or `regex:PATTERN` (the first match of
PATTERN, its group 1 if it has groups, in the completion equals that in the reference).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from acf.core.errors import AcfError, DataError
from acf.tasks.base import Item, Task
from acf.tasks.data import subset
from acf.tasks.own_data import OwnData, Row, check_train_share, describe_split, read_own_data

#: how many train items a few-shot plain prompt takes them from (fixed, so shots do not move with --seed)
SHOT_SEED = 1234


def _collapse(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Scorer:
    """How a generated completion is judged against the reference (`--scorer`)."""

    spec: str                       # as the user wrote it: "exact" or "regex:PATTERN"
    pattern: Optional[re.Pattern] = None

    def extract(self, text: str) -> Optional[str]:
        """What is compared: the whole text (exact), or the first match / its group 1 (regex); None if no match."""
        if self.pattern is None:
            return _collapse(text)
        m = self.pattern.search(text)
        if m is None:
            return None
        return _collapse(m.group(1) if self.pattern.groups else m.group(0))


def parse_scorer(spec: Optional[str]) -> Optional[Scorer]:
    if spec is None or spec == "":
        return None
    if spec == "exact":
        return Scorer(spec)
    if spec.startswith("regex:"):
        try:
            return Scorer(spec, re.compile(spec[len("regex:"):]))
        except re.error as e:
            raise AcfError(f"--scorer {spec}: not a valid regular expression ({e})") from None
    raise AcfError(f"--scorer {spec!r}: give exact or regex:PATTERN")


class CustomTask(Task):
    """A dataset file as a task. Quality metrics: answer_nll always; accuracy when a scorer is given."""

    hub_id = ""
    metrics: tuple[str, ...] = ("answer_nll",)
    quality_metric = "answer_nll"
    #: generation ends at EOS (the chat template's end of turn) or at the next plain-prompt turn, never on a pattern
    done_pattern: Optional[str] = None

    def __init__(self, path: str | Path, train_share: Optional[float] = None, scorer: Optional[str] = None):
        super().__init__(data_dir=None, subtask=None)
        self.data: OwnData = read_own_data(path)
        self.name = self.data.path.name
        self.path = self.data.path
        self.sha256 = self.data.sha256
        self.train_share = check_train_share(train_share)
        self.scorer = parse_scorer(scorer)
        if self.scorer is not None:
            self.metrics = ("accuracy", "answer_nll")
            self.quality_metric = "accuracy"
        items = {r.line: self._item(r) for r in self.data.rows}    # in file order: the first bad row is named
        train, test = self.data.split(self.train_share)
        self.split_facts: dict[str, Any] = describe_split(self.data, train, test, self.train_share)
        self._items = {"train": [items[r.line] for r in train], "test": [items[r.line] for r in test]}

    def _item(self, row: Row) -> Item:
        target = None
        if self.scorer is not None:
            target = self.scorer.extract(row.reference)
            if target is None:
                # a reference the scorer cannot read has nothing to be scored against: refused where it is
                raise DataError(f"{self.path}:{row.line}: the reference response does not match --scorer "
                                f"{self.scorer.spec} ({row.reference.strip()[:60]!r})")
        return Item(id=f"line-{row.line}", prompt=row.prompt, reference=row.reference, target=target,
                    meta={"messages": row.messages, "line": row.line})

    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        if split not in self._items:
            raise DataError(f"{self.name} has splits test and train, not {split!r}")
        return subset(self._items[split], limit, seed)

    def train_pairs(self, n: int, seed: int = 0) -> list[Item]:
        """Calibration and training render these as evaluation does (chat template) + the reference response."""
        return self.load("train", limit=n, seed=seed)

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        return [f"{self.plain_prompt(it)} {it.reference}" for it in self.load("train", limit=n, seed=seed)]

    def chat_prompt(self, item: Item, tokenizer, fewshot: int = 0) -> str:
        """The conversation before the reference (system turns included) through the model's chat template, with
        the generation prompt; a tokenizer without one (or a few-shot prompt) gets the plain transcript."""
        if fewshot == 0 and getattr(tokenizer, "chat_template", None):
            try:
                return tokenizer.apply_chat_template(item.meta["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as e:  # e.g. a template that refuses a system turn: the user's data meets this model
                raise DataError(f"{self.path}:{item.meta['line']}: the model's chat template refuses this "
                                f"conversation ({type(e).__name__}: {e})") from None
        return self.plain_prompt(item, fewshot)

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        shots = ""
        if fewshot:
            for ex in self.load("train", limit=fewshot, seed=SHOT_SEED):
                shots += f"{transcript(ex.meta['messages'])} {ex.reference}\n\n"
        return shots + transcript(item.meta["messages"])

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        if self.scorer is None:
            raise NotImplementedError(f"{self.name} has no scorer (--scorer exact|regex:PATTERN)")
        got = self.scorer.extract(completion)
        return (got is not None and got == item.target), got

    def stop_strings(self) -> list[str]:
        return ["\n\nUser:"]


def transcript(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text for models without a chat template, ending where the assistant answers."""
    return "\n\n".join([f"{m['role'].capitalize()}: {m['content']}" for m in messages] + ["Assistant:"])
