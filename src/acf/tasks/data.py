"""Dataset location and reading: `--data-dir`, then `$ACF_DATA_DIR/<task>`, then the HF hub, else one clear error."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from acf.core.errors import DataError


def locate(task: str, data_dir: Optional[str | os.PathLike], required: Sequence[str]) -> Optional[Path]:
    """The local folder for a task, or None if neither --data-dir nor $ACF_DATA_DIR/<task> exists.

    An explicit --data-dir that is missing or lacks a required file is an error (the user asked for it);
    a missing $ACF_DATA_DIR/<task> just means "try the hub".
    """
    if data_dir:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise DataError(f"--data-dir {d}: no such directory")
        missing = [r for r in required if not (d / r).exists()]
        if missing:
            raise DataError(f"--data-dir {d}: missing {', '.join(missing)} (a {task} folder needs {', '.join(required)})")
        return d
    root = os.environ.get("ACF_DATA_DIR")
    if root:
        d = Path(root).expanduser() / task
        if d.is_dir() and all((d / r).exists() for r in required):
            return d
    return None


def json_objects(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL text; a line that is not a JSON object is refused
    with its file:line (the one rule every JSONL reader of acf applies)."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def read_jsonl(path: Path, required_keys: Sequence[str] = (),
               check: Optional[Callable[[dict], Optional[str]]] = None) -> list[dict]:
    """The JSON objects of a JSONL file (blank lines skipped). A line that is not a JSON object, lacks a required
    key, or for which `check(row)` returns a problem is refused with DataError naming `path:line`, so a bad row
    is fixed where it is rather than scored wrongly later."""
    rows = []
    opener: Callable = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, row in json_objects(path, f):
            missing = [k for k in required_keys if k not in row]
            if missing:
                raise DataError(f"{path}:{i}: missing field(s) {', '.join(missing)}")
            problem = check(row) if check is not None else None
            if problem:
                raise DataError(f"{path}:{i}: {problem}")
            rows.append(row)
    return rows


def load_hub(task: str, hub_id: str, config: Optional[str], split: str, local_hint: str) -> list[dict]:
    """Load a split from the HF hub; any failure becomes one message naming both ways to provide the data."""
    try:
        from datasets import load_dataset

        ds = load_dataset(hub_id, config, split=split)
        return [dict(r) for r in ds]
    except Exception as e:  # offline, missing package, auth: the user's fix is the same
        raise DataError(
            f"no local {task} data and the hub dataset {hub_id!r} could not be loaded ({type(e).__name__}). "
            f"Pass --data-dir DIR (a folder with {local_hint}) or set ACF_DATA_DIR to a root holding {task}/"
        ) from None


def subset(rows: list, limit: Optional[int], seed: Optional[int]) -> list:
    """A deterministic subset: the first `limit` items of a seeded permutation (seed None: file order)."""
    if limit is not None and limit <= 0:
        raise DataError(f"--limit must be a positive number of items (got {limit})")
    idx = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(idx)
    if limit is not None:
        idx = idx[:limit]
    return [rows[i] for i in idx]
