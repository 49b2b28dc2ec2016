"""Calibration text apart from the evaluation data (`--calib-data FILE`).

A run evaluates on its task (a built-in task or `--dataset FILE`), but every calibration consumer (the quantizers'
calibration windows, the Fisher sensitivity pass of per-layer allocations, kd_tune/LoRA/distill training text, block
importance, the GGUF importance matrix) reads `task.train_texts` / `task.train_pairs` from the step context's task.
`CalibTextTask` wraps the run's task: its `train_texts` come from the user's file, everything else (name, prompts,
scoring, metrics) is the task's. It has no `train_pairs`, so calibration packs the file's texts as plain text and
training takes each whole text as its target (acf.methods.calibration).

Formats:
- `.txt`: paragraphs separated by blank lines, one text each;
- `.jsonl`: one object a line, either `{"text": str}` or a row `acf.tasks.own_data` reads (chat `messages`, or
  `prompt`/`response`), rendered as one plain transcript ("User: ...\\n\\nAssistant: response");
- `.csv`: `prompt` and `response` columns (acf.tasks.own_data), rendered the same way.

Every text is checked when the file is read, before any model loads; a bad line is refused with `FILE:LINE`.
The general-text share (`calib_mix`) is unchanged: that share of windows still comes from other tasks' train
splits, the rest from the file instead of the task's train split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from acf.core.errors import DataError
from acf.tasks.data import subset

EXTENSIONS = (".txt", ".jsonl", ".csv")
#: what a wrapper answers itself; every other attribute is the wrapped task's
_OWN = frozenset({"train_pairs"})


@dataclass
class CalibData:
    """A checked calibration file: its texts in file order and the line each starts on."""

    path: Path
    sha256: str
    texts: list[str]
    lines: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How records name the source: the file's name and a digest prefix (the path may differ between hosts)."""
        return f"--calib-data {self.path.name} (sha256 {self.sha256[:12]})"


def read_calib_data(path: str | Path) -> CalibData:
    """Read and check a calibration file; DataError names FILE:LINE for the first bad line (FILE alone for a missing
    file, an unknown extension or an empty file)."""
    from acf.tasks.own_data import read_text_file

    path = Path(path).expanduser()
    text, digest = read_text_file(path, "--calib-data", EXTENSIONS,
                          f"unknown extension {path.suffix or '(none)'!r}; use .txt (paragraphs separated by blank "
                          f"lines), .jsonl ({{\"text\": ...}} or chat/prompt-response rows) or .csv (prompt and "
                          f"response columns)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        pairs = _paragraphs(text)
    elif suffix == ".jsonl":
        pairs = _jsonl_texts(path, text)
    else:
        pairs = _csv_texts(path, text)
    if not pairs:
        raise DataError(f"--calib-data {path}: the file holds no text; give calibration text (a .txt of paragraphs, "
                        f"or .jsonl/.csv rows)")
    return CalibData(path=path.resolve(), sha256=digest, texts=[t for _, t in pairs],
                     lines=[i for i, _ in pairs])


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(first line, paragraph) for each run of non-blank lines."""
    out: list[tuple[int, str]] = []
    start, buf = 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not buf:
                start = i
            buf.append(line.rstrip())
        elif buf:
            out.append((start, "\n".join(buf)))
            buf = []
    if buf:
        out.append((start, "\n".join(buf)))
    return out


def _render(messages: list[dict[str, str]], reference: str) -> str:
    from acf.tasks.custom import transcript

    return f"{transcript(messages)} {reference}"


def _jsonl_texts(path: Path, text: str) -> list[tuple[int, str]]:
    from acf.tasks.data import json_objects
    from acf.tasks.own_data import row_of

    out: list[tuple[int, str]] = []
    for i, obj in json_objects(path, text.splitlines()):
        if "text" in obj:
            t = obj["text"]
            if not isinstance(t, str):
                raise DataError(f"{path}:{i}: text must be a string, not {type(t).__name__}")
            if not t.strip():
                raise DataError(f"{path}:{i}: text is empty")
            out.append((i, t))
            continue
        if not any(k in obj for k in ("messages", "prompt", "response")):
            raise DataError(f"{path}:{i}: expected a 'text' field, chat 'messages', or 'prompt' and 'response'; got "
                            f"{', '.join(map(repr, list(obj)[:5])) or 'an empty object'}")
        try:
            row = row_of(obj, i)
        except ValueError as e:
            raise DataError(f"{path}:{i}: {e}") from None
        out.append((i, _render(row.messages, row.reference)))
    return out


def _csv_texts(path: Path, text: str) -> list[tuple[int, str]]:
    from acf.tasks.own_data import read_csv

    return [(r.line, _render(r.messages, r.reference)) for r in read_csv(path, text)]


class CalibTextTask:
    """The run's task with its calibration/training text taken from a file: `train_texts(n, seed)` gives the first
    `n` of a seeded permutation of the file's texts (deterministic for a seed, prefix-stable in `n`, as
    `Task.train_texts`); every other attribute is the wrapped task's."""

    def __init__(self, task: Any, data: CalibData):
        self._task = task
        self.calib = data

    @property
    def task(self) -> Any:
        return self._task

    @property
    def calib_source(self) -> str:
        """What step records say of the task part of their calibration text."""
        return self.calib.label

    @property
    def calib_key(self) -> str:
        """The calibration text's identity in caches keyed on it (sensitivity passes)."""
        return f"{getattr(self._task, 'name', 'task')}+calib-data-{self.calib.sha256[:16]}"

    def train_texts(self, n: int, seed: int = 0) -> list[str]:
        return subset(self.calib.texts, n, seed)

    def __getattr__(self, attr: str) -> Any:
        task = self.__dict__.get("_task")
        if task is None or attr in _OWN:
            raise AttributeError(attr)
        return getattr(task, attr)

    def __repr__(self) -> str:
        return f"CalibTextTask({getattr(self._task, 'name', self._task)!r}, {self.calib.label})"


def with_calib_data(task: Any, path: Optional[str | Path]) -> Any:
    """`task` itself without a file; else the task with its calibration text read (and checked) from `path`."""
    if not path:
        return task
    return CalibTextTask(task, read_calib_data(path))
