"""HumanEval: complete a Python function from its signature and docstring; pass@1 by running the unit tests.

Generation: the problem's prompt as a plain code prefix (no chat template: the model continues the function),
greedy, stopped at the first top-level statement after the body ('\\ndef ', '\\nclass ', '\\nif ', '\\nprint(',
'\\n#', '\\nassert'), as in the HumanEval paper. Scoring runs prompt + completion + the problem's tests +
`check(entry_point)` in `acf.evaluation.sandbox` (separate process, limits, no network; see docs/tasks.md) and
needs explicit consent: `HumanEval(allow_code_execution=True)` or `task.allow_code_execution = True`
(the CLI's --allow-code-execution). pass@1 with greedy decoding = share of problems whose tests pass.

Splits. No training split exists: problems with index i % 8 == 7 (20 of 164) are held out as calibration texts
(prompt + canonical solution); "test" is the other 144. Local data: `HumanEval.jsonl.gz` (or `.jsonl`);
hub: `openai/openai_humaneval` (split test).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from ..data import load_hub, locate, read_jsonl, subset
from ..errors import AcfError, DataError
from .base import Item, Task

FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
HOLDOUT_EVERY = 8
STOPS = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert"]


def truncate_completion(text: str) -> str:
    """Cut a completion at the first top-level statement that is not part of the function body."""
    cut = len(text)
    for s in STOPS:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(item: Item, completion: str) -> str:
    return f"{item.prompt}{completion}\n\n{item.meta['test']}\n\ncheck({item.meta['entry_point']})\n"


class HumanEval(Task):
    name = "humaneval"
    hub_id = "openai/openai_humaneval"
    metrics = ("pass@1",)
    task_metrics = ("pass@1",)
    quality_metric = "pass@1"
    max_new_tokens = 384
    #: seconds each test program may run (the reference solutions take well under one)
    timeout = 10.0

    def __init__(self, data_dir: Optional[str] = None, subtask: Optional[str] = None,
                 allow_code_execution: bool = False):
        if subtask:
            raise DataError(f"humaneval has no subtasks (got {subtask!r})")
        super().__init__(data_dir, None)
        self.allow_code_execution = allow_code_execution

    def _rows(self) -> list[dict]:
        for f in FILES:
            try:
                d = locate("humaneval", self.data_dir, (f,))
            except DataError:
                if f == FILES[-1]:
                    raise
                continue
            if d is not None:
                return read_jsonl(d / f, KEYS)
        return load_hub("humaneval", self.hub_id, None, "test", FILES[0])

    def load(self, split: str = "test", limit: Optional[int] = None, seed: Optional[int] = 0) -> list[Item]:
        if split not in ("test", "train"):
            raise DataError(f"humaneval has splits test and train, not {split!r}")
        items = [Item(id=r["task_id"], prompt=r["prompt"], reference=r["canonical_solution"], target=None,
                      meta={"test": r["test"], "entry_point": r["entry_point"]})
                 for i, r in enumerate(self._rows()) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == (split == "train")]
        return subset(items, limit, seed)

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        return [it.prompt + it.reference for it in self.load("train", limit=n, seed=seed)]

    def chat_prompt(self, item: Item, tokenizer, fewshot: int = 0) -> str:
        return item.prompt

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        return item.prompt

    def stop_strings(self) -> list[str]:
        return list(STOPS)

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        from ..evaluation.sandbox import check_program

        res = check_program(build_program(item, truncate_completion(completion)),
                            allow_code_execution=self.allow_code_execution, timeout=self.timeout)
        return res.passed, res.status

    def evaluate_metric(self, name: str, model, tokenizer, items: list[Item], batch_size: int = 8,
                        progress=None) -> tuple[Any, list[dict]]:
        from ..evaluation.generate import batched, generate_batch
        from ..evaluation.sandbox import check_program, isolation, require_consent
        from ..evaluation.stats import wilson_interval
        from ..provenance import Measurement, device_string, runtime_string

        if name != "pass@1":
            raise AcfError(f"task humaneval does not offer metric {name!r} (it offers pass@1)")
        require_consent(self.allow_code_execution)          # refuse before spending time on generation
        device = str(next(model.parameters()).device)
        t0 = time.perf_counter()
        order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt))
        comps: dict[int, tuple[str, int]] = {}
        for chunk in batched(order, batch_size):
            outs = generate_batch(model, tokenizer, [items[i].prompt for i in chunk], self.max_new_tokens,
                                  stop_strings=STOPS)
            for i, o in zip(chunk, outs):
                comps[i] = o
            if progress:
                progress(len(chunk))
        gen_s = time.perf_counter() - t0
        rows, k = [], 0
        for i, it in enumerate(items):
            text, ntok = comps[i]
            comp = truncate_completion(text)
            res = check_program(build_program(it, comp), allow_code_execution=True, timeout=self.timeout)
            k += res.passed
            rows.append({"id": it.id, "correct": res.passed, "status": res.status, "completion": comp,
                         "new_tokens": ntok, "stderr_tail": res.stderr[-300:]})
        n = len(items)
        iso = isolation()
        layers = "separate python -I process, rlimits, minimal env, empty tmp dir, wall-clock timeout" + (
            ", net/pid/mount namespaces" if iso["namespaces"] else "") + (", uid nobody" if iso["drop_to_nobody"] else "")
        m = Measurement(value=k / n if n else None, unit="fraction", device=device_string(device),
                        runtime=runtime_string(), n=n, seconds=round(time.perf_counter() - t0, 3),
                        ci95=wilson_interval(k, n),
                        method=f"greedy completion of the function (plain prompt, batch {batch_size}, max "
                               f"{self.max_new_tokens} new tokens), unit tests executed in the acf sandbox "
                               f"({layers}; {self.timeout:g} s per problem); pass@1 = share passing",
                        extra={"passed": k, "generation_seconds": round(gen_s, 3)})
        return m, rows
