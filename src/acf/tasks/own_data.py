"""A user's own dataset file (`acf run --dataset FILE`): reading, checking every row, and the train/test split.

Formats (docs/tasks.md, "Your own data"):
- `.jsonl`, one object a line: chat messages `{"messages": [{"role": "system"|"user"|"assistant", "content": str},
  ...]}` whose last message is the assistant's reference response, or a pair `{"prompt": str, "response": str}`;
- `.csv` with `prompt` and `response` columns (others ignored).

Every row is checked when the file is read, before any model loads: a bad row is refused with `FILE:LINE` so the
user fixes it where it is, rather than the run scoring something else in silence.

The split is a property of the file, not of `--seed`: a row is a calibration ("train") row when the SHA-256 of its
content, read as a fraction in [0, 1), is below the train share. Identical rows therefore always land on the same
side (a duplicated prompt never leaks from calibration into evaluation), and appending rows never moves the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from acf.core.errors import DataError
from acf.tasks.data import json_objects

EXTENSIONS = (".jsonl", ".csv")
ROLES = ("system", "user", "assistant")
#: share of rows held out of evaluation for calibration and recovery training when `--train-share` is not given
DEFAULT_TRAIN_SHARE = 0.2
#: salt of the split hash: changing it would move every row, so it is part of the recorded rule
SPLIT_SALT = "acf-own-data-split-v1"
SPLIT_RULE = (f"a row is a train (calibration) row when int(h[:8], 16) / 16**8 < train_share, h = sha256 of "
              f"'{SPLIT_SALT}' + json.dumps([messages before the reference, reference], sort_keys=True, "
              f"ensure_ascii=False); if that leaves a side empty, the ceil(train_share * rows) lowest-h rows")


@dataclass
class Row:
    """One checked row: the conversation before the reference (the prompt as the model sees it) and the reference."""

    line: int
    messages: list[dict[str, str]]          # system/user/assistant turns before the reference response
    reference: str
    key: str = field(default="")            # content hash (the split and duplicate detection read it)

    def __post_init__(self) -> None:
        if not self.key:
            blob = json.dumps([self.messages, self.reference], ensure_ascii=False, sort_keys=True)
            self.key = hashlib.sha256((SPLIT_SALT + blob).encode("utf-8")).hexdigest()

    @property
    def fraction(self) -> float:
        return int(self.key[:8], 16) / 16 ** 8

    @property
    def prompt(self) -> str:
        """The last user turn (what a plain display or a scorer's report shows of the question)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class OwnData:
    path: Path
    sha256: str
    rows: list[Row]

    def split(self, train_share: float) -> tuple[list[Row], list[Row]]:
        """(train, test), each in file order, by the content-hash rule above (SPLIT_RULE)."""
        train = [r for r in self.rows if r.fraction < train_share]
        if not train or len(train) == len(self.rows):
            k = min(max(1, math.ceil(train_share * len(self.rows))), len(self.rows) - 1)
            keys = {id(r) for r in sorted(self.rows, key=lambda r: r.key)[:k]}
            train = [r for r in self.rows if id(r) in keys]
        held = {id(r) for r in train}
        return train, [r for r in self.rows if id(r) not in held]


def is_dataset_file(name: str) -> bool:
    """Whether `--dataset` names a file rather than a built-in task: task names (gsm8k, bbh:date_understanding)
    never hold a path separator or a dot, so anything that does is read as a path, and an existing file always is."""
    if not name:
        return False
    return "/" in name or "\\" in name or "." in Path(name).name or Path(name).expanduser().is_file()


def read_text_file(path: Path, option: str, extensions: tuple[str, ...] | frozenset[str] | set[str], unknown: str
                   ) -> tuple[str, str]:
    """(text, sha256 of the bytes) of a user's data file, checked the one way every file option is (`--dataset`,
    `--calib-data`): its extension, that it exists, and UTF-8 (a bad byte named by FILE:LINE). `unknown`: what to
    say of another extension."""
    if path.suffix.lower() not in extensions:
        raise DataError(f"{option} {path}: {unknown}")
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


def read_own_data(path: str | Path) -> OwnData:
    """Read and check a dataset file; DataError names FILE:LINE for the first bad row (FILE alone for a missing
    file or an unknown extension, which have no line)."""
    path = Path(path).expanduser()
    text, digest = read_text_file(path, "--dataset", EXTENSIONS,
                          f"unknown dataset extension {path.suffix or '(none)'!r}; use .jsonl (chat messages or "
                          f"prompt/response pairs) or .csv (prompt and response columns), or a task name")
    rows = read_csv(path, text) if path.suffix.lower() == ".csv" else _read_jsonl(path, text)
    if len(rows) < 2:
        where, got = (f"{path}:{rows[0].line}", "only one row") if rows else (f"{path}:1", "the file is empty")
        raise DataError(f"{where}: {got}; a dataset needs at least 2 rows (one for calibration, one to evaluate)")
    return OwnData(path=path.resolve(), sha256=digest, rows=rows)


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for i, obj in json_objects(path, text.splitlines()):
        try:
            rows.append(row_of(obj, i))
        except ValueError as e:
            raise DataError(f"{path}:{i}: {e}") from None
    return rows


def row_of(obj: dict[str, Any], line: int) -> Row:
    """A checked Row from a JSONL object, or ValueError saying what is wrong with it."""
    if "messages" in obj:
        return _chat_row(obj["messages"], line)
    missing = [k for k in ("prompt", "response") if k not in obj]
    if len(missing) == 2:
        raise ValueError("expected 'messages' (chat) or 'prompt' and 'response' fields; got "
                         f"{', '.join(map(repr, list(obj)[:5])) or 'an empty object'}")
    if missing:
        raise ValueError(f"missing field {missing[0]!r}")
    return _pair_row(obj["prompt"], obj["response"], line)


def _pair_row(prompt: Any, response: Any, line: int) -> Row:
    for name, v in (("prompt", prompt), ("response", response)):
        if not isinstance(v, str):
            raise ValueError(f"{name} must be a string, not {type(v).__name__}")
        if not v.strip():
            raise ValueError(f"{name} is empty")
    return Row(line=line, messages=[{"role": "user", "content": prompt}], reference=response)


def _chat_row(messages: Any, line: int) -> Row:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {j} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {j}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {j}: content must be a string, not {type(m['content']).__name__}")
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message (the last assistant message is the reference response)")
    if last != len(messages) - 1:
        raise ValueError(f"message {last + 2} ({messages[last + 1]['role']}) follows the last assistant message; the "
                         f"reference response must end the conversation")
    context = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    if not any(m["role"] == "user" for m in context):
        raise ValueError("no user message before the reference response")
    if not messages[last]["content"].strip():
        raise ValueError(f"the reference response (message {last + 1}) is empty")
    return Row(line=line, messages=context, reference=messages[last]["content"])


def read_csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = reader.fieldnames or []
    except csv.Error as e:
        raise DataError(f"{path}:1: not valid CSV ({e})") from None
    missing = [c for c in ("prompt", "response") if c not in columns]
    if missing:
        if not columns:
            raise DataError(f"{path}:1: the file is empty; a .csv dataset needs a header with prompt and response")
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)} (a .csv dataset needs prompt and "
                        f"response; the header has {', '.join(columns)})")
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{start}: not valid CSV ({e})") from None
        try:
            rows.append(_pair_row(rec.get("prompt") or "", rec.get("response") or "", start))
        except ValueError as e:
            raise DataError(f"{path}:{start}: {e}") from None
    return rows


def describe_split(data: OwnData, train: list[Row], test: list[Row], train_share: float) -> dict[str, Any]:
    """What run_config.json and frontier.json record of the split (enough to redo it and to check it)."""
    return {"rows": len(data.rows), "train": len(train), "test": len(test), "train_share": train_share,
            "rule": SPLIT_RULE, "train_lines_first": [r.line for r in train[:10]]}


def check_train_share(train_share: Optional[float]) -> float:
    share = DEFAULT_TRAIN_SHARE if train_share is None else float(train_share)
    if not 0.0 < share < 1.0:
        raise DataError(f"--train-share is the share of the file's rows kept for calibration: give a number "
                        f"strictly between 0 and 1 (got {train_share})")
    return share
