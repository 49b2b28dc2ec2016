"""The planner log (run_dir/planner_log.jsonl) and the scrubbing of secrets from everything the planner writes."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any

LOG_NAME = "planner_log.jsonl"

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_KEY_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|hf_[A-Za-z0-9]{10,}|AIza[0-9A-Za-z_\-]{20,}|gsk_[A-Za-z0-9]{10,}"
                         r"|xai-[A-Za-z0-9]{10,}|AKIA[0-9A-Z]{12,})")


def scrub(text: Any) -> str:
    """Remove secret-looking environment values and common API-key shapes from text acf is about to write.

    Provider errors sometimes echo (part of) the key, and a model can repeat anything in its context; nothing
    that reaches frontier.json, the checkpoint or the planner log may carry one.
    """
    s = text if isinstance(text, str) else str(text)
    for name, val in os.environ.items():
        if val and len(val) >= 8 and _SECRET_NAME.search(name) and val in s:
            s = s.replace(val, "***")
    return _KEY_SHAPES.sub("***", s)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue   # a damaged line costs that record only
    return out


_LOG_LOCK = threading.Lock()


def append_log(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to run_dir/planner_log.jsonl atomically (rewrite + rename: never half a line)."""
    from acf.core.atomic import write_text

    path = Path(run_dir) / LOG_NAME
    line = scrub(json.dumps(record, default=str))
    with _LOG_LOCK:
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text(path, old + line + "\n")


def read_planner_log(run_dir: str | Path) -> list[dict]:
    """The planner's accepted and rejected proposals of a run, oldest first."""
    return read_log(Path(run_dir) / LOG_NAME)
