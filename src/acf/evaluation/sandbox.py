"""Run untrusted, model-written Python (HumanEval) in a constrained child process.

Why: pass@1 is measured by executing code a model wrote. That code can loop forever, allocate without bound,
fork, delete files, read secrets from the environment or talk to the network, by accident or not. Each program
therefore runs in its own process, and every layer below is applied where the OS allows it:

1. a fresh `python -I` process (isolated mode: no PYTHON* variables, no user site, no cwd on sys.path);
2. a minimal environment: PATH and LANG only (nothing inherited: no *_KEY, *_TOKEN, HF_*, ...);
3. an empty temporary working directory, removed afterwards;
4. resource limits (`setrlimit`): CPU seconds, address space, file size, open files, number of processes
   (no fork bombs), no core dumps;
5. a wall-clock timeout; on expiry the whole process group (and, with namespaces, the whole PID namespace)
   is killed;
6. when running as root and `unshare` works: new network namespace (no interface but a down loopback: no
   network at all), new PID namespace (killing its init kills every descendant, even ones that called
   setsid), new mount namespace with private tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock (writes to
   world-writable places vanish with the sandbox), and the program drops to user `nobody` (uid 65534) before
   it runs, so it cannot write root-owned files, signal our processes, or exceed RLIMIT_NPROC (which does
   not bind root);
7. a Python preamble (defence in depth, bypassable by determined code, e.g. via `_socket` or `ctypes`):
   socket creation raises, writing files outside the working directory raises, destructive os/shutil calls
   and process spawning helpers are disabled.

Outcome: any failure, crash, timeout or kill of the child is a failed sample; the caller's process is never
affected. `isolation()` reports which layers hold on this machine. Nothing here runs without
`allow_code_execution=True`.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from acf.core.errors import AcfError

NOBODY = 65534
CONSENT_MESSAGE = ("scoring this task executes model-written code; pass --allow-code-execution "
                   "(allow_code_execution=True) to run it in acf's sandbox (see docs/tasks.md for what the sandbox holds)")


@dataclass
class SandboxResult:
    passed: bool
    status: str            # passed | failed | timeout | killed | error
    returncode: Optional[int]
    seconds: float
    stdout: str = ""
    stderr: str = ""


def require_consent(allow_code_execution: bool) -> None:
    """Refuse to execute model code unless the user said so explicitly."""
    if not allow_code_execution:
        raise AcfError(CONSENT_MESSAGE)


@functools.lru_cache(maxsize=None)
def isolation() -> dict:
    """Which OS isolation layers are available here (probed once): namespaces, privilege drop."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    unshare = shutil.which("unshare")
    ns = False
    if unshare and root:
        try:
            r = subprocess.run([unshare, "--net", "--pid", "--fork", "--kill-child", "--mount", "true"],
                               capture_output=True, timeout=10)
            ns = r.returncode == 0
        except (OSError, subprocess.SubprocessError):
            ns = False
    return {"namespaces": ns, "unshare": unshare, "drop_to_nobody": root, "root": root,
            "python": _sandbox_python(root)}


def _sandbox_python(root: bool) -> str:
    """An interpreter whose standard library `nobody` can still import after the privilege drop.

    The project venv's Python may live under /root (0700); a system python3 usually does not. HumanEval needs
    only the standard library, so any Python 3 will do. Falls back to sys.executable (with PREIMPORT).
    """
    if not root:
        return sys.executable
    probe = f"import os; os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY}); import json, shutil, hashlib"
    for cand in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not cand:
            continue
        try:
            r = subprocess.run([cand, "-I", "-c", probe], capture_output=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
            if r.returncode == 0:
                return cand
        except (OSError, subprocess.SubprocessError):
            continue
    return sys.executable


# The preamble runs in the child as `python -I -c PREAMBLE`; the program source arrives on stdin.
_PREAMBLE = r'''
import os, sys
_src = sys.stdin.read()
sys.stdin = open(os.devnull)
import builtins, io, shutil, socket, subprocess
if os.geteuid() == 0:
    for _m in %(preimport)r:
        try:
            __import__(_m)
        except Exception:
            pass
    os.setgroups([]); os.setgid(%(uid)d); os.setuid(%(uid)d)
def _no_net(*a, **k):
    raise OSError("network access is disabled in the acf sandbox")
for _n in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
           "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _n, _no_net)
_cwd = os.path.realpath(os.getcwd())
_open = builtins.open
def _inside(p):
    try:
        return os.path.realpath(os.fspath(p)).startswith(_cwd + os.sep)
    except TypeError:
        return True  # file descriptors
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError("writing outside the sandbox directory is disabled")
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded_open
def _disabled(*a, **k):
    raise PermissionError("disabled in the acf sandbox")
for _n in ("system", "popen", "kill", "killpg", "fork", "forkpty", "remove", "unlink", "rmdir", "removedirs",
           "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown", "putenv", "execv", "execve",
           "execvp", "execvpe", "spawnv", "spawnve", "setuid", "setgid"):
    if hasattr(os, _n):
        setattr(os, _n, _disabled)
shutil.rmtree = shutil.move = shutil.chown = _disabled
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = subprocess.check_call = _disabled
del _n
exec(compile(_src, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
'''

#: stdlib modules imported before the privilege drop when the interpreter's library is not readable by `nobody`
#: (e.g. a pyenv Python under /root): code importing anything else then fails, which counts as a failed sample
PREIMPORT = ("math", "re", "string", "typing", "collections", "collections.abc", "itertools", "functools", "heapq",
             "bisect", "hashlib", "random", "fractions", "decimal", "statistics", "json", "copy", "operator",
             "datetime", "numbers", "array", "enum", "dataclasses", "unittest", "traceback", "textwrap")

_WRAPPER = ("set -e; for d in /tmp /var/tmp /dev/shm /run/lock; do [ -d $d ] && mount -t tmpfs -o size=%(mb)dm,mode=1777 "
            "tmpfs $d; done; mkdir /tmp/work; chown %(uid)d:%(uid)d /tmp/work; cd /tmp/work; \"$0\" \"$@\"")


def _nproc_limit(extra: int) -> int:
    """RLIMIT_NPROC counts every process of the real uid: allow what the user already runs plus `extra`."""
    if isolation()["drop_to_nobody"]:
        return extra
    try:
        import psutil

        uid = os.getuid()
        mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid)
        return mine + extra
    except Exception:  # psutil missing or /proc unreadable: a generous but finite cap
        return 4096


def _limits(cpu_s: int, memory_mb: int, file_mb: int, nproc: int):
    def apply() -> None:
        import resource

        def cap(which, value):
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                soft, hard = resource.getrlimit(which)
                v = value if hard == resource.RLIM_INFINITY else min(value, hard)
                resource.setrlimit(which, (v, v))

        cap(resource.RLIMIT_CPU, cpu_s)
        cap(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
        cap(resource.RLIMIT_FSIZE, file_mb * 1024 * 1024)
        cap(resource.RLIMIT_NOFILE, 64)
        cap(resource.RLIMIT_CORE, 0)
        cap(resource.RLIMIT_NPROC, nproc)

    return apply


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(source: str, *, allow_code_execution: bool = False, timeout: float = 10.0, memory_mb: int = 1024,
                file_mb: int = 16, max_procs: int = 16, python: Optional[str] = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; passed means exit status 0 within the limits."""
    require_consent(allow_code_execution)
    iso = isolation()
    py = python or iso["python"]
    tmp = Path(tempfile.mkdtemp(prefix="acf-sandbox-"))
    work = tmp / "work"
    work.mkdir()
    out_f, err_f = tmp / "stdout", tmp / "stderr"
    preamble = _PREAMBLE % {"uid": NOBODY, "preimport": PREIMPORT}
    cmd = [py, "-I", "-c", preamble]
    if iso["namespaces"]:
        cmd = [iso["unshare"], "--net", "--pid", "--fork", "--kill-child", "--mount",
               "sh", "-c", _WRAPPER % {"mb": max(file_mb * 4, 16), "uid": NOBODY}] + cmd
    elif iso["drop_to_nobody"]:
        os.chown(work, NOBODY, NOBODY)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    t0 = time.perf_counter()
    status, rc = "error", None
    with open(out_f, "wb") as so, open(err_f, "wb") as se:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=so, stderr=se, cwd=work, env=env,
                                    start_new_session=True,
                                    preexec_fn=_limits(int(timeout) + 1, memory_mb, file_mb, _nproc_limit(max_procs)))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            return SandboxResult(False, "error", None, 0.0, stderr=f"could not start sandbox: {e}")
        try:
            proc.communicate(source.encode("utf-8"), timeout=timeout)
            rc = proc.returncode
            status = "passed" if rc == 0 else ("killed" if rc < 0 else "failed")
        except subprocess.TimeoutExpired:
            status = "timeout"
        except (BrokenPipeError, OSError):
            status = "failed"
        finally:
            _kill_group(proc)
            rc = proc.returncode if rc is None else rc
    res = SandboxResult(passed=status == "passed", status=status, returncode=rc,
                        seconds=round(time.perf_counter() - t0, 3), stdout=_tail(out_f), stderr=_tail(err_f))
    shutil.rmtree(tmp, ignore_errors=True)
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (with namespaces: unshare --kill-child then takes the namespace down)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def check_program(source: str, *, allow_code_execution: bool = False, timeout: float = 10.0,
                  memory_mb: int = 1024) -> SandboxResult:
    """Run a test program and count it as passed only if it exits 0 *and* reaches its end.

    A random marker printed after the last statement guards against code that calls sys.exit(0) / os._exit(0)
    early (which would otherwise look like a pass).
    """
    marker = "ACF-DONE-" + secrets.token_hex(8)
    res = run_program(source + f"\n\nprint({marker!r})\n", allow_code_execution=allow_code_execution,
                      timeout=timeout, memory_mb=memory_mb)
    if res.passed and marker not in res.stdout:
        res.passed, res.status = False, "failed"
    return res
