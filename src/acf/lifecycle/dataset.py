"""collect: good {prompt, answer} rows into the adapter dataset (deduplicated, secrets refused), and the stable
train/held-out split of that dataset."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from acf.core.atomic import write_json, write_text
from acf.core.errors import DataError
from acf.coordinator.state import now


SECRET_PATTERNS: dict[str, re.Pattern] = {
    "openai/anthropic-style key (sk-...)": re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}"),
    "GitHub token (ghp_/gho_/ghs_/...)": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "AWS access key id (AKIA...)": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "Slack token (xox...)": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Bearer token": re.compile(r"\bBearer\s+[A-Za-z0-9\-._~+/]{16,}=*"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Google API key (AIza...)": re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b"),
    "long hex/base64 value after key=": re.compile(
        r"(?i)\b[\w-]*(?:key|secret|token|passw(?:or)?d|pwd|auth|credential)[\w-]*\s*[=:]\s*['\"]?"
        r"(?:[A-Fa-f0-9]{20,}|[A-Za-z0-9+/_\-]{24,}={0,2})"),
}


def find_secrets(text: str) -> list[str]:
    """Names of the secret patterns found in `text` (never the secret itself, so logs stay clean)."""
    return [name for name, pat in SECRET_PATTERNS.items() if pat.search(text or "")]


# ------------------------------------------------------------------------------------------------ collect

_ALIASES = {"prompt": ("prompt", "input", "question", "instruction"),
            "answer": ("answer", "output", "response", "completion"),
            "score": ("score", "rating", "reward"),
            "approved": ("approved", "approval", "accepted"),
            "id": ("id", "run_id")}
_TRUE = {"true", "1", "yes", "y", "approved", "t"}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv or .jsonl file (refused by name when unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suf = path.suffix.lower()
    try:
        if suf == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if suf in (".jsonl", ".ndjson"):
            lines = path.read_text(encoding="utf-8").splitlines()
            return [_jsonl_object(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: expected a .csv or .jsonl file")


def _jsonl_object(path: Path, i: int, line: str) -> dict:
    """Line `i` of a .jsonl dataset as a dict, or a DataError naming the file and the line."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
    if isinstance(obj, dict):
        return obj
    raise DataError(f"{path}:{i}: each line must be a JSON object")


def row_field(row: dict, name: str) -> Any:
    for k in _ALIASES[name]:
        if k in row and row[k] not in (None, ""):
            return row[k]
    return None


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def row_key(prompt: str, answer: str) -> str:
    """Dedup key: whitespace-normalised prompt and answer (case kept: case can matter for answers)."""
    return hashlib.sha256(f"{_norm(prompt)}\x00{_norm(answer)}".encode()).hexdigest()[:16]


class CollectStats(BaseModel):
    at: str
    runs_file: str
    eval_file: Optional[str] = None
    min_score: float
    rows_read: int = 0
    kept: int = 0
    missing_fields: int = 0
    below_min_score: int = 0
    not_approved: int = 0
    duplicates_in_batch: int = 0
    already_in_dataset: int = 0
    secrets_refused: int = 0
    secret_rows: list[dict[str, Any]] = Field(default_factory=list)   # {row, patterns}: never the text itself
    secrets_allowed: bool = False
    dataset_rows_before: int = 0
    dataset_rows_after: int = 0


def stats_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.stem + ".stats.json")


def _apply_eval(rows: list[dict], eval_rows: list[dict], eval_file: Path) -> None:
    """Scores/approvals from an eval file override the runs file's, joined on id (or on the prompt)."""
    by_id = {str(row_field(r, "id")): r for r in eval_rows if row_field(r, "id") is not None}
    by_prompt = {_norm(row_field(r, "prompt")): r for r in eval_rows if row_field(r, "prompt") is not None}
    if not by_id and not by_prompt:
        raise DataError(f"{eval_file}: needs an 'id' or 'prompt' column to join on, plus 'score' and/or 'approved'")
    for r in rows:
        rid, p = row_field(r, "id"), row_field(r, "prompt")
        ev = by_id.get(str(rid)) if rid is not None else None
        if ev is None and p is not None:
            ev = by_prompt.get(_norm(p))
        if ev is not None:
            for k in ("score", "approved"):
                v = row_field(ev, k)
                if v is not None:
                    r[k] = v


def collect(runs: str | Path, out: str | Path, eval_file: Optional[str | Path] = None, min_score: float = 0.7,
            allow_secrets: bool = False) -> CollectStats:
    """Append good, approved, new, secret-free {prompt, answer} rows to `out`; write stats beside it."""
    runs, out = Path(runs), Path(out)
    rows = read_rows(runs)
    if eval_file is not None:
        _apply_eval(rows, read_rows(eval_file), Path(eval_file))
    existing = read_rows(out) if out.exists() else []
    have = {r.get("key") or row_key(r.get("prompt", ""), r.get("answer", "")) for r in existing}
    st = CollectStats(at=now(), runs_file=str(runs.resolve()), eval_file=str(Path(eval_file).resolve()) if eval_file
                      else None, min_score=min_score, rows_read=len(rows), secrets_allowed=allow_secrets,
                      dataset_rows_before=len(existing))
    new: list[dict] = []
    seen: set[str] = set()
    for i, r in enumerate(rows, 1):
        prompt, answer, score = row_field(r, "prompt"), row_field(r, "answer"), row_field(r, "score")
        if prompt is None or answer is None or score is None:
            st.missing_fields += 1
            continue
        hits = find_secrets(f"{prompt}\n{answer}")
        if hits and not allow_secrets:
            st.secrets_refused += 1
            st.secret_rows.append({"row": i, "patterns": hits})
            continue
        try:
            s = float(score)
        except (TypeError, ValueError):
            st.missing_fields += 1
            continue
        if not s >= min_score:
            st.below_min_score += 1
            continue
        if str(row_field(r, "approved") or "").strip().lower() not in _TRUE and row_field(r, "approved") is not True:
            st.not_approved += 1
            continue
        key = row_key(prompt, answer)
        if key in seen:
            st.duplicates_in_batch += 1
            continue
        if key in have:
            st.already_in_dataset += 1
            continue
        seen.add(key)
        new.append({"id": key, "key": key, "prompt": str(prompt), "answer": str(answer), "score": s,
                    "source": runs.name, "source_id": row_field(r, "id"), "added_at": st.at})
    if not new:
        raise DataError(f"no rows passed from {runs} ({st.rows_read} read: {st.below_min_score} below score "
                        f"{min_score}, {st.not_approved} not approved, {st.already_in_dataset} already in the "
                        f"dataset, {st.duplicates_in_batch} duplicates, {st.secrets_refused} with secrets, "
                        f"{st.missing_fields} missing prompt/answer/score); {out} was not changed")
    st.kept = len(new)
    st.dataset_rows_after = len(existing) + len(new)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    write_text(out, text + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
    sp = stats_path(out)
    hist = []
    if sp.exists():
        try:
            hist = json.loads(sp.read_text()).get("collections", [])
        except (OSError, ValueError):
            hist = []
    write_json(sp, {"dataset": str(out.resolve()), "rows": st.dataset_rows_after, "collections": hist + [st.model_dump()]})
    return st


# ------------------------------------------------------------------------------------------------ dataset split


def load_dataset(path: str | Path) -> list[dict]:
    rows = read_rows(path)
    bad = [i for i, r in enumerate(rows, 1) if not r.get("prompt") or r.get("answer") in (None, "")]
    if bad:
        raise DataError(f"{path}: rows {bad[:5]} lack prompt/answer (make it with `acf distill collect`)")
    for r in rows:
        r.setdefault("id", row_key(r["prompt"], r["answer"]))
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def split_rows(rows: list[dict], holdout: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, held-out). A row is held out when its id hashes below `holdout`: stable as the dataset grows.

    Small datasets where the hash rule gives an empty side fall back to the lowest-hash ceil(holdout * n) rows.
    """
    def frac(r: dict) -> float:
        return int(hashlib.sha256(str(r["id"]).encode()).hexdigest()[:8], 16) / 16 ** 8

    held = [r for r in rows if frac(r) < holdout]
    if not held or len(held) == len(rows):
        k = min(max(1, math.ceil(holdout * len(rows))), len(rows) - 1)
        order = sorted(rows, key=frac)
        held = order[:k]
    ids = {r["id"] for r in held}
    return [r for r in rows if r["id"] not in ids], held
