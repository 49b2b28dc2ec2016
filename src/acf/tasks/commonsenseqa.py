"""CommonsenseQA: 5-choice commonsense questions, scored by log-likelihood of each answer text.

Splits. Only the dev file (`dev_rand_split.jsonl`, 1221 items, the usual evaluation set since the test labels
are hidden) is shipped locally. Calibration and recovery training need texts the evaluation never sees, so with
local data the evaluated split ("test") is the first 1000 dev items in file order and the calibration pool
("train") is the last 221. If the folder also holds `train_rand_split.jsonl`, that is the calibration pool and
all 1221 dev items are evaluated; from the hub (`tau/commonsense_qa`) "test" is the validation split and
"train" the train split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from acf.tasks.data import load_hub, locate, read_jsonl, subset
from acf.core.errors import DataError
from acf.tasks.base import Item
from acf.tasks.mc import MultipleChoiceTask

DEV_FILE = "dev_rand_split.jsonl"
TRAIN_FILE = "train_rand_split.jsonl"
EVAL_ITEMS = 1000          # with only the dev file: items [0, 1000) evaluated, [1000, 1221) held out


class CommonsenseQA(MultipleChoiceTask):
    name = "commonsenseqa"
    hub_id = "tau/commonsense_qa"
    prompt_desc = "prompt 'Question: {question}\\nAnswer:', choices ' {text}'"

    def _rows(self) -> tuple[list[dict], Optional[list[dict]], str]:
        """(dev rows, train rows or None, source)."""
        d = locate("commonsenseqa", self.data_dir, (DEV_FILE,))
        keys = ("question", "choices", "answerKey")
        if d is not None:
            dev = read_jsonl(d / DEV_FILE, keys)
            train = read_jsonl(d / TRAIN_FILE, keys) if (d / TRAIN_FILE).is_file() else None
            return dev, train, str(d)
        dev = load_hub("commonsenseqa", self.hub_id, None, "validation", DEV_FILE)
        train = load_hub("commonsenseqa", self.hub_id, None, "train", DEV_FILE)
        return dev, train, self.hub_id

    def _split(self, split: str) -> list[Item]:
        dev, train, src = self._rows()
        if split == "test":
            rows, offset = (dev, 0) if train is not None else (dev[:EVAL_ITEMS], 0)
        elif split == "train":
            rows, offset = (train, 0) if train is not None else (dev[EVAL_ITEMS:], EVAL_ITEMS)
        else:
            raise DataError(f"commonsenseqa has splits test and train, not {split!r}")
        name = TRAIN_FILE if (split == "train" and train is not None) else DEV_FILE
        return [self._item(r, i + offset, Path(src) / name if not src.startswith(self.hub_id) else src)
                for i, r in enumerate(rows)]

    @staticmethod
    def _item(r: dict, i: int, where) -> Item:
        ch = r["choices"]
        if not isinstance(ch, dict) or "label" not in ch or "text" not in ch:
            raise DataError(f"{where}:{i + 1}: field choices must be {{label: [...], text: [...]}}")
        labels, texts = list(ch["label"]), list(ch["text"])
        if r["answerKey"] not in labels:
            raise DataError(f"{where}:{i + 1}: answerKey {r['answerKey']!r} is not one of the labels {labels}")
        gold = labels.index(r["answerKey"])
        return Item(id=str(r.get("id") or f"csqa-{i}"), prompt=r["question"].strip(), reference=texts[gold],
                    target=gold, choices=texts, meta={"labels": labels, "line": i + 1})

    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        return subset(self._split(split), limit, seed)

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        return [f"Question: {it.prompt}\nAnswer: {it.reference}" for it in self.load("train", limit=n, seed=seed)]

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        return f"Question: {item.prompt}\nAnswer:"
