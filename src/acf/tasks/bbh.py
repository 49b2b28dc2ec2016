"""BIG-Bench Hard: 27 reasoning tasks, 3-shot chain-of-thought prompts, exact match on the final answer.

Prompt (as in the BBH paper and lm-evaluation-harness `bbh_cot_fewshot`): the task's `cot-prompts/<task>.txt`
(description + 3 worked exemplars), then 'Q: {input}\\nA: Let's think step by step.' and greedy generation.
Scoring: the text after the first 'the answer is' (up to the end of its line, trailing '.' removed) must
equal the target; case-insensitive, and for option targets like '(B)' a bare 'B' or '(B) text' also counts.
No 'the answer is' in the completion: wrong.

`bbh` evaluates every task (`limit` items per task) and reports the mean of the per-task accuracies;
`bbh:<task>` evaluates one task. Splits: the last 10 examples of each task are held out from evaluation and
serve, with the 3 CoT exemplars, as calibration texts ("train"); "test" is the rest. Local data: `tasks/*.json`
and `cot-prompts/*.txt`; hub: `lukaemon/bbh` (config = task, split test) with the CoT prompts still read locally
when present (the hub dataset has none; then the prompt is zero-shot).

answer_nll: teacher-forced NLL of ' {target}.' after the 3-shot prompt, the question and 'A: So the answer is'
(a direct-answer proxy that needs no generation; it tracks compression damage, it is not a CoT measurement).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from acf.core.errors import AcfError, DataError
from acf.core.intervals import wilson_interval
from acf.tasks.base import Item, Task
from acf.tasks.data import load_hub, locate, subset

BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
HELD_OUT = 10
_ANSWER = re.compile(r"the answer is\s*(.*)", re.IGNORECASE)
_OPTION = re.compile(r"^\(?([A-R])\)?(?:$|[\s.,:)])")


def extract_answer(completion: str) -> Optional[str]:
    """The answer after the first 'the answer is' (rest of that line, trailing period dropped), or None."""
    m = _ANSWER.search(completion or "")
    if not m:
        return None
    ans = m.group(1).split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    return ans


def answer_matches(extracted: Optional[str], target: str) -> bool:
    if extracted is None:
        return False
    t = target.strip()
    if extracted.lower() == t.lower():
        return True
    mt = re.fullmatch(r"\(([A-R])\)", t)
    if mt:
        me = _OPTION.match(extracted)
        return bool(me and me.group(1) == mt.group(1))
    return False


def _cot_prefix(text: str) -> str:
    """Drop the canary line and the '-----' separator of a cot-prompts file."""
    if "-----" in text:
        text = text.split("-----", 1)[1]
    return text.strip()


class BBH(Task):
    name = "bbh"
    hub_id = "lukaemon/bbh"
    metrics = ("accuracy", "answer_nll")
    task_metrics = ("accuracy", "answer_nll")
    quality_metric = "accuracy"
    #: generation budget for the chain of thought (exemplars use 50-250 tokens)
    max_new_tokens = 256

    def __init__(self, data_dir: Optional[str] = None, subtask: Optional[str] = None):
        if subtask is not None and subtask not in BBH_TASKS:
            raise DataError(f"unknown BBH task {subtask!r}: choose one of {', '.join(BBH_TASKS)} (or 'bbh' for all)")
        super().__init__(data_dir, subtask)
        self._prompts: dict[str, str] = {}
        self._rows_cache: dict[str, list[dict]] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return (self.subtask,) if self.subtask else BBH_TASKS

    def _dir(self) -> Optional[Path]:
        first = self.tasks[0]
        return locate("bbh", self.data_dir, (f"tasks/{first}.json",))

    def _rows(self, task: str) -> list[dict]:
        if task in self._rows_cache:
            return self._rows_cache[task]
        d = self._dir()
        if d is not None:
            path = d / "tasks" / f"{task}.json"
            if not path.is_file():
                raise DataError(f"{d}: no tasks/{task}.json (a BBH folder holds tasks/<task>.json for the 27 tasks)")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
            ex = data.get("examples") if isinstance(data, dict) else None
            if not isinstance(ex, list):
                raise DataError(f"{path}:1: expected an object with a list 'examples'")
            for i, r in enumerate(ex):
                missing = [k for k in ("input", "target") if not isinstance(r, dict) or k not in r]
                if missing:
                    raise DataError(f"{path}: example {i + 1}: missing field(s) {', '.join(missing)}")
            rows = ex
        else:
            rows = load_hub("bbh", self.hub_id, task, "test", "tasks/<task>.json and cot-prompts/<task>.txt")
        self._rows_cache[task] = rows
        return rows

    def cot_prompt(self, task: str) -> str:
        if task not in self._prompts:
            d = self._dir()
            p = d / "cot-prompts" / f"{task}.txt" if d is not None else None
            self._prompts[task] = _cot_prefix(p.read_text(encoding="utf-8")) if p is not None and p.is_file() else ""
        return self._prompts[task]

    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        """Items of every selected task; `limit` applies per task (so `bbh` with limit 5 gives 27 x 5 items)."""
        if split not in ("test", "train"):
            raise DataError(f"bbh has splits test and train, not {split!r}")
        out: list[Item] = []
        for task in self.tasks:
            rows = self._rows(task)
            part = rows[-HELD_OUT:] if split == "train" else rows[:-HELD_OUT]
            off = len(rows) - HELD_OUT if split == "train" else 0
            items = [Item(id=f"{task}-{i + off}", prompt=r["input"].strip(), reference=str(r["target"]).strip(),
                          target=str(r["target"]).strip(), meta={"task": task}) for i, r in enumerate(part)]
            out.extend(subset(items, limit, seed))
        return out

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        texts = []
        for task in self.tasks:
            texts += [b.strip() for b in re.split(r"\n\n(?=Q: )", self.cot_prompt(task)) if b.startswith("Q: ")]
        texts += [f"Q: {it.prompt}\nA: So the answer is {it.reference}." for it in self.load("train", seed=seed)]
        import random

        random.Random(seed).shuffle(texts)
        return texts[:n]

    def plain_prompt(self, item: Item, fewshot: int = 3) -> str:
        pre = self.cot_prompt(item.meta["task"])
        return (pre + "\n\n" if pre else "") + f"Q: {item.prompt}\nA: Let's think step by step."

    def chat_prompt(self, item: Item, tokenizer, fewshot: int = 3) -> str:
        return self.plain_prompt(item)           # few-shot CoT is a plain continuation prompt

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        got = extract_answer(completion)
        return answer_matches(got, item.target), got

    def stop_strings(self) -> list[str]:
        return ["\n\nQ:", "\nQ:"]

    # whitespace after the final period, not end of text: "the answer is 3." may still become "3.5." (a row that
    # ends with EOS stops anyway)
    done_pattern = r"the answer is [^\n]*?\.\s"

    # --- metrics -------------------------------------------------------------------------------------------
    def evaluate_metric(self, name: str, model, tokenizer, items: list[Item], batch_size: int = 8,
                        progress=None) -> tuple[Any, list[dict]]:
        if name == "accuracy":
            return self._accuracy(model, tokenizer, items, batch_size, progress)
        if name == "answer_nll":
            return self._answer_nll(model, tokenizer, items, batch_size, progress)
        raise AcfError(f"task bbh does not offer metric {name!r} (it offers accuracy, answer_nll)")

    def _accuracy(self, model, tokenizer, items, batch_size, progress):
        from acf.evaluation.quality import accuracy

        m, rows = accuracy(model, tokenizer, self, items, batch_size=batch_size, max_new_tokens=self.max_new_tokens,
                           fewshot=3, progress=progress)
        per: dict[str, list[int]] = {}
        for it, r in zip(items, rows):
            r["task"] = it.meta["task"]
            per.setdefault(it.meta["task"], [0, 0])
            per[it.meta["task"]][0] += r["correct"]
            per[it.meta["task"]][1] += 1
        accs = {t: k / n for t, (k, n) in per.items()}
        k_all, n_all = sum(k for k, _ in per.values()), sum(n for _, n in per.values())
        m.value = sum(accs.values()) / len(accs) if accs else None
        m.ci95 = wilson_interval(k_all, n_all)
        m.method = (f"greedy generation, 3-shot CoT prompt, batch {batch_size}, max {self.max_new_tokens} new tokens, "
                    f"exact match on the answer after 'the answer is'; value = mean of per-task accuracies over "
                    f"{len(accs)} task(s); ci95 = Wilson on the pooled {n_all} items")
        m.extra.update({"per_task": {t: round(a, 4) for t, a in accs.items()}, "pooled_accuracy":
                        k_all / n_all if n_all else None})
        return m, rows

    def _answer_nll(self, model, tokenizer, items, batch_size, progress):
        from acf.evaluation.multiple_choice import score_choices
        from acf.core.provenance import Measurement, device_string, runtime_string

        t0 = time.perf_counter()
        reqs = [(self.plain_prompt(it).rsplit("A: Let's think step by step.", 1)[0] + "A: So the answer is",
                 [f" {it.target}."]) for it in items]
        sc = score_choices(model, tokenizer, reqs, batch_size=max(1, batch_size // 2), progress=progress)
        nll = -sum(s[0].logprob for s in sc)
        toks = sum(s[0].tokens for s in sc)
        dev = str(next(model.parameters()).device)
        return Measurement(value=nll / max(toks, 1), unit="nats/token", device=device_string(dev),
                           runtime=runtime_string(), n=len(items), seconds=round(time.perf_counter() - t0, 3),
                           method="teacher-forced NLL of ' {target}.' after the 3-shot CoT prompt + question + "
                                  "'A: So the answer is' (token-weighted mean)", extra={"tokens": toks}), []
