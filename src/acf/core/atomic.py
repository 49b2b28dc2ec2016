"""Atomic file and directory writes: a killed process leaves the old file or none, never half of one."""

from __future__ import annotations

import json
import os
import re
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


#: separates the owner fields in a temporary directory's name; no host name, pid or mkdtemp suffix contains it
_OWNER_SEP = "@"


def _host() -> str:
    """This machine's name as it goes into a temporary name (only characters a host name may hold, never `@`)."""
    import socket

    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def tmp_prefix(final: str | os.PathLike) -> str:
    """The name prefix of `atomic_dir`'s temporaries for `final`: `.tmp-<name>@<host>@<pid>@` (mkdtemp adds a
    random suffix). The owner is in the name, not in a file inside, because the folder becomes the final model
    directory as it is: nothing but the method's output may be in it."""
    return f".tmp-{Path(final).name}{_OWNER_SEP}{_host()}{_OWNER_SEP}{os.getpid()}{_OWNER_SEP}"


def tmp_owner(path: str | os.PathLike) -> Optional[tuple[str, int]]:
    """(host, pid) of the process that made a `.tmp-*` directory, or None for a name without an owner (made
    before names carried one)."""
    parts = Path(path).name.rsplit(_OWNER_SEP, 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, under another user
        return True
    return True


def tmp_is_orphan(path: str | os.PathLike) -> bool:
    """True for a `.tmp-*` directory whose maker is gone: made on this host by a pid that no longer runs, or made
    before names carried an owner. Another host's temporaries are never orphans here: its pids cannot be checked
    from this machine."""
    owner = tmp_owner(path)
    if owner is None:
        return True
    host, pid = owner
    return host == _host() and pid != os.getpid() and not _pid_alive(pid)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final` only when the block finishes.

    A directory that exists under its final name is therefore complete. The temporary's name carries this
    process's host and pid (`tmp_prefix`), so another process writing into the same parent folder (a second
    `acf compress`, a worker sharing the artifacts folder) can tell a live one from a killed one's leftover:
    `clean_partial_dirs` removes only the latter. A leftover is never loaded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(final), dir=final.parent))
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
    """Remove the temporary directories under `parent` left by killed `atomic_dir` blocks (`tmp_is_orphan`); those
    of processes still running, here or on another host, are left alone. Returns what was removed."""
    removed = []
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(".tmp-*"):
            if tmp_is_orphan(p):
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
