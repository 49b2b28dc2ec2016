"""HumanEval: complete a Python function from its signature and docstring; pass@1 by running the unit tests.

Generation is greedy (up to 384 new tokens) in one of two prompt styles (`HumanEval(prompt_style=...)` or the
`prompt_style` attribute; default "chat", which passed 8/144 against plain's 5/144 on SmolLM2-135M-Instruct,
experiments/results/humaneval-cpu.md; "chat" falls back to "plain" for a tokenizer without a chat template):

- "plain": the problem's prompt as a plain code prefix (no chat template: the model continues the function),
  with its trailing newline removed. Every prompt ends in a docstring and '\\n'; fed as is, a BPE tokenizer ends
  it with a lone '\\n' token, while in code the body's first line begins with one '\\n'+indent token, so the
  model takes the function as finished (SmolLM2-135M-Instruct then closed a markdown fence and wrote prose, or
  started a new `def`: 0/20; 1/20 without the newline). bigcode-evaluation-harness strips the prompt for the
  same reason. The continuation is cut at the first top-level statement after the body (STOPS: the HumanEval
  paper's '\\ndef ', '\\nclass ', '\\nif ', '\\nprint(', '\\n#', '\\nassert', plus bigcode's '\\n@' and a
  closing markdown fence '\\n```').
- "chat": the tokenizer's chat template, the user asking for the completed function in one ```python block. The
  first fenced block (the raw text when there is none) is the model's code. If it re-states
  `def <entry_point>(`, the program is the problem's prompt (its imports and helpers; the stub, whose body is its
  docstring, is valid Python) followed by the model's top-level imports, defs, classes and call-free assignments
  (its own example calls and prints are dropped), which redefine the function. Otherwise the code is a body
  appended to the prompt (indented by four spaces when the model wrote it unindented).

Scoring runs the program + the problem's tests + `check(entry_point)` in `acf.evaluation.sandbox` (separate
process, limits, no network; see docs/tasks.md) and needs explicit consent: `HumanEval(allow_code_execution=True)`
or `task.allow_code_execution = True` (the CLI's --allow-code-execution). pass@1 with greedy decoding = share of
problems whose tests pass.

Splits. No training split exists: problems with index i % 8 == 7 (20 of 164) are held out as calibration texts
(prompt + canonical solution); "test" is the other 144. Local data: `HumanEval.jsonl.gz` (or `.jsonl`);
hub: `openai/openai_humaneval` (split test).
"""

from __future__ import annotations

import ast
import re
import textwrap
import time
from typing import Any, Optional

from acf.core.errors import AcfError, DataError
from acf.core.intervals import wilson_interval
from acf.tasks.base import Item, Task
from acf.tasks.data import load_hub, locate, read_jsonl, subset

FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
HOLDOUT_EVERY = 8
STOPS = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert", "\n@", "\n```"]
PROMPT_STYLES = ("plain", "chat")
#: chat measured better on SmolLM2-135M-Instruct (8/144 vs 5/144, experiments/results/humaneval-cpu.md)
DEFAULT_STYLE = "chat"
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python "
                    "code block.\n\n```python\n{code}\n```")
#: a chat answer is complete once its first code block is closed
CHAT_DONE = r"```[^\n]*\n[\s\S]*?```"
_FENCE = re.compile(r"```[ \t]*[\w.+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def truncate_completion(text: str) -> str:
    """Cut a completion at the first top-level statement that is not part of the function body."""
    cut = len(text)
    for s in STOPS:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def extract_code(text: str) -> str:
    """The first markdown code block of a chat answer (up to the end if it is never closed), else the raw text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None


def top_level_definitions(code: str) -> str:
    """Imports, functions, classes and call-free assignments of `code`, dropping its example calls and prints.

    Code that does not parse is returned as written: its SyntaxError is the model's result, not the harness's."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    lines = code.splitlines(keepends=True)
    parts = []
    for node in tree.body:
        keep = isinstance(node, _KEEP) or (isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None
                                           and not any(isinstance(n, ast.Call) for n in ast.walk(node.value)))
        if keep:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            parts.append("".join(lines[start - 1:node.end_lineno]).rstrip() + "\n")
    return "\n".join(parts)


def chat_completion(entry_point: str, answer: str) -> str:
    """What follows the problem's prompt in the program, from a chat answer (see the module docstring)."""
    code = extract_code(answer)
    if defines(code, entry_point):
        return "\n" + top_level_definitions(textwrap.dedent(code))
    first = next((ln for ln in code.splitlines() if ln.strip()), "")
    if first and not first[0].isspace():
        code = textwrap.indent(code, "    ")
    return truncate_completion(code)


def build_program(item: Item, completion: str, head: Optional[str] = None) -> str:
    """`head` (default: the problem's prompt) + completion + the problem's tests + `check(entry_point)`."""
    head = item.prompt if head is None else head
    return f"{head}{completion}\n\n{item.meta['test']}\n\ncheck({item.meta['entry_point']})\n"


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
                 allow_code_execution: bool = False, prompt_style: str = DEFAULT_STYLE):
        if subtask:
            raise DataError(f"humaneval has no subtasks (got {subtask!r})")
        super().__init__(data_dir, None)
        self.allow_code_execution = allow_code_execution
        self.prompt_style = prompt_style
        self.style()

    def style(self, tokenizer=None) -> str:
        """The prompt style in effect: `prompt_style`, except "plain" for a tokenizer without a chat template."""
        if self.prompt_style not in PROMPT_STYLES:
            raise AcfError(f"humaneval prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                           f"not {self.prompt_style!r}")
        if self.prompt_style == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            return "plain"
        return self.prompt_style

    @property
    def done_pattern(self) -> Optional[str]:
        return CHAT_DONE if self.style() == "chat" else None

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
        """The text generation starts from, in the prompt style in effect for this tokenizer."""
        if self.style(tokenizer) == "plain":
            return self.plain_prompt(item, fewshot)
        return tokenizer.apply_chat_template([{"role": "user", "content": self.instruction(item)}],
                                             tokenize=False, add_generation_prompt=True)

    def instruction(self, item: Item) -> str:
        return CHAT_INSTRUCTION.format(code=item.prompt.strip())

    def plain_prompt(self, item: Item, fewshot: int = 0) -> str:
        return item.prompt.rstrip()

    def stop_strings(self) -> list[str]:
        return list(STOPS) if self.style() == "plain" else []

    def assemble(self, item: Item, generated: str, style: Optional[str] = None) -> tuple[str, str]:
        """(head, completion) of the program for text generated from `chat_prompt(item)` in `style`
        (default: `prompt_style`). program = head + completion + tests."""
        if (style or self.style()) == "plain":
            return self.plain_prompt(item), truncate_completion(generated)
        return item.prompt, chat_completion(item.meta["entry_point"], generated)

    def score(self, completion: str, item: Item) -> tuple[bool, Any]:
        from acf.evaluation.sandbox import check_program

        head, comp = self.assemble(item, completion)
        res = check_program(build_program(item, comp, head), allow_code_execution=self.allow_code_execution,
                            timeout=self.timeout)
        return res.passed, res.status

    def evaluate_metric(self, name: str, model, tokenizer, items: list[Item], batch_size: int = 8,
                        progress=None) -> tuple[Any, list[dict]]:
        from acf.evaluation.generate import generate_all
        from acf.evaluation.sandbox import check_program, isolation, require_consent
        from acf.core.provenance import Measurement, device_string, runtime_string

        if name != "pass@1":
            raise AcfError(f"task humaneval does not offer metric {name!r} (it offers pass@1)")
        require_consent(self.allow_code_execution)          # refuse before spending time on generation
        style = self.style(tokenizer)
        device = str(next(model.parameters()).device)
        t0 = time.perf_counter()
        prompts = [self.chat_prompt(it, tokenizer) for it in items]
        outs, engine = generate_all(model, tokenizer, prompts, self.max_new_tokens, batch_size=batch_size,
                                    done_pattern=CHAT_DONE if style == "chat" else None,
                                    stop_strings=list(STOPS) if style == "plain" else [], progress=progress)
        comps = dict(enumerate(outs))
        gen_s = time.perf_counter() - t0
        rows, k = [], 0
        for i, it in enumerate(items):
            text, ntok = comps[i]
            head, comp = self.assemble(it, text, style)
            res = check_program(build_program(it, comp, head), allow_code_execution=True, timeout=self.timeout)
            k += res.passed
            rows.append({"id": it.id, "correct": res.passed, "status": res.status, "prompt_style": style,
                         "completion": comp, "generated": text, "new_tokens": ntok,
                         "stderr_tail": res.stderr[-300:]})
        n = len(items)
        iso = isolation()
        layers = "separate python -I process, rlimits, minimal env, empty tmp dir, wall-clock timeout" + (
            ", net/pid/mount namespaces" if iso["namespaces"] else "") + (", uid nobody" if iso["drop_to_nobody"] else "")
        how = ("plain prompt without its trailing newline, continuation cut at the first top-level statement"
               + ("" if style == self.prompt_style else " (the tokenizer has no chat template)")
               if style == "plain" else
               "chat template, first ```python block; a re-stated def replaces the prompt's stub")
        m = Measurement(value=k / n if n else None, unit="fraction", device=device_string(device),
                        runtime=runtime_string(), n=n, seconds=round(time.perf_counter() - t0, 3),
                        ci95=wilson_interval(k, n),
                        method=f"greedy completion of the function ({how}; {engine}, max "
                               f"{self.max_new_tokens} new tokens), unit tests executed in the acf sandbox "
                               f"({layers}; {self.timeout:g} s per problem); pass@1 = share passing",
                        extra={"passed": k, "generation_seconds": round(gen_s, 3), "prompt_style": style})
        return m, rows
