"""GSM8K: grade-school math, exact match on the final number; answer NLL on the reference solution."""

from __future__ import annotations

import re
from typing import Any, Optional

from acf.core.errors import DataError
from acf.tasks.base import Item, Task
from acf.tasks.data import load_hub, locate, read_jsonl, subset

_CALC = re.compile(r"<<[^>]*>>")
_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(s: str) -> Optional[str]:
    """'$1,234.00' -> '1234'; '3.50' -> '3.5'; '-0' -> '0'. None if no number."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    m = re.search(r"-?\d+(?:\.\d+)?", s)
    if not m:
        return None
    v = m.group(0)
    if "." in v:
        v = v.rstrip("0").rstrip(".")
    if v in ("-0", ""):
        v = "0"
    return v


def extract_answer(text: str) -> Optional[str]:
    """The text after '####' if present, else the last number in the text."""
    if text is None:
        return None
    if "####" in text:
        after = text.split("####", 1)[1]
        got = normalize_number(after.split("\n")[0] if after.strip() else after)
        if got is not None:
            return got
    nums = _NUM.findall(text)
    return normalize_number(nums[-1]) if nums else None


def final_answer_problem(row: dict) -> Optional[str]:
    """What keeps a GSM8K row from having a target, or None. The target is the number after the answer's
    `####`; without one, `extract_answer` would fall back to the last number of the worked solution (or to none,
    for an answer like "six"), and accuracy would be scored against that in silence."""
    answer = row.get("answer")
    if not isinstance(answer, str):
        return f"answer must be a string, not {type(answer).__name__}"
    if "####" not in answer:
        return (f"answer has no final '#### <number>' (GSM8K's answer ends with it); got "
                f"{answer.strip()[-60:]!r}")
    final = answer.split("####", 1)[1].strip().split("\n")[0]
    if normalize_number(final) is None:
        return f"answer's final '####' is not followed by a number (got '#### {final[:40]}')"
    return None


def clean_solution(answer: str) -> str:
    """Reference solution without the dataset's calculator annotations (<<48/2=24>>), which no model writes."""
    return _CALC.sub("", answer).strip()


class GSM8K(Task):
    name = "gsm8k"
    hub_id = "openai/gsm8k"
    metrics = ("accuracy", "answer_nll")
    quality_metric = "accuracy"
    FILES = ("test.jsonl",)

    def _rows(self, split: str) -> list[dict]:
        d = locate("gsm8k", self.data_dir, self.FILES)
        if d is not None:
            path = d / f"{split}.jsonl"
            if not path.is_file():
                raise DataError(f"{d}: no {split}.jsonl (GSM8K needs train.jsonl for calibration and test.jsonl)")
            return read_jsonl(path, ("question", "answer"), check=final_answer_problem)
        return load_hub("gsm8k", self.hub_id, "main", split, "train.jsonl and test.jsonl")

    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        rows = self._rows(split)
        items = [Item(id=f"{split}-{i}", prompt=r["question"].strip(), reference=clean_solution(r["answer"]),
                      target=extract_answer(r["answer"])) for i, r in enumerate(rows)]
        return subset(items, limit, seed)

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        items = self.load("train", limit=n, seed=seed)
        return [f"Question: {it.prompt}\nAnswer: {it.reference}" for it in items]

    def train_pairs(self, n: int, seed: int = 0) -> list[Item]:
        return self.load("train", limit=n, seed=seed)

    def instruction(self, item: Item) -> str:
        return f"{item.prompt}\nSolve it step by step, then give the final answer after '####'."

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        shots = ""
        if fewshot:
            for ex in self.load("train", limit=fewshot, seed=1234):
                shots += f"Question: {ex.prompt}\nAnswer: {ex.reference}\n\n"
        return f"{shots}Question: {item.prompt}\nAnswer:"

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        got = extract_answer(completion)
        return (got is not None and got == item.target), got

    def stop_strings(self) -> list[str]:
        return ["\n\nQuestion:"]
