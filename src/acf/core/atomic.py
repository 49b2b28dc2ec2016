"""Atomic file and directory writes: a killed process leaves the old file or none, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from acf.core.errors import AcfError


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_strict(path: str | os.PathLike, what: Optional[str], error: type[AcfError] = AcfError, *,
                     missing: Optional[str] = None, unchanged: bool = True) -> Any:
    """The parsed JSON in `path`; a file that cannot be read or parsed is refused with `error`, naming the file.

    The message is `{path}: {what}, not valid JSON ({reason}); nothing was changed` (`what` is e.g. "corrupt
    registry"; None leaves it out, `unchanged=False` the last clause), or `{path}: {missing}` for a file that does
    not exist when `missing` is given. Shape checks (schema version, pydantic) stay with the caller.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if missing is not None and isinstance(e, FileNotFoundError):
            msg = missing
        else:
            msg = (f"{what}, " if what else "") + f"not valid JSON ({e})" + ("; nothing was changed" if unchanged else "")
        raise error(f"{path}: {msg}") from None


def validate_strict(model: Any, raw: Any, path: str | os.PathLike, what: str, error: type[AcfError]) -> Any:
    """`model.model_validate(raw)`, or `error` naming the file, the first invalid field and that nothing changed
    (a persisted file that parses but does not match its schema is refused the same way everywhere)."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise error(f"{path}: {what} ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                    f"nothing was changed") from None


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only when the block finishes.

    A directory that exists under its final name is therefore complete. A leftover `.tmp-*` sibling
    (from a killed process) is never loaded and is removed by `clean_partial_dirs`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_readable(folder: str | os.PathLike) -> None:
    """Give a folder meant to be handed on (an export, a merged model) the permissions of any other the user makes,
    umask applied: `atomic_dir`'s temporary directory and `write_text`'s files are created private (mkdtemp,
    mkstemp), and copying a run's model folder copies its private mode too."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(folder)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def clean_partial_dirs(parent: str | os.PathLike) -> list[Path]:
    """Remove temporary directories left by killed `atomic_dir` blocks under `parent`."""
    removed = []
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (cache keys and manifests of weights and references)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
