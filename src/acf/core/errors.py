"""Typed errors. `AcfError` is what a user sees as one clear line; the CLI maps it to exit code 2."""

from __future__ import annotations


class AcfError(Exception):
    """An error caused by input or environment that the user can fix; printed as one line, no traceback."""


class ModelNotFound(AcfError):
    pass


class DataError(AcfError):
    pass


class StrategyError(AcfError):
    """An invalid strategy. Carries every problem found, so a user fixes them all at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid strategy: " + "; ".join(self.problems))


class MethodFailed(AcfError):
    """A compression step could not run (no CUDA, out of memory, invalid shape, library error).

    `kind` is a short machine-readable reason recorded in the frontier (e.g. "oom", "no_cuda", "shape", "library").
    """

    def __init__(self, method: str, kind: str, reason: str):
        self.method, self.kind, self.reason = method, kind, reason
        super().__init__(f"{method} failed ({kind}): {reason}")


class RunDirError(AcfError):
    pass
