"""Compression methods. Each implementation takes (params, in_dir, out_dir, ctx) and writes a loadable model into
out_dir (a temporary directory renamed into place only on success); it returns extra facts for the record.

Methods are declared in `acf.methods.registry` (one `MethodSpec` each, implementation included)."""

from __future__ import annotations

from acf.methods.base import UNDECLARED_IMPLS, MethodFn, StepContext, StepRecord, get_impl, register  # noqa: F401

_IMPL = UNDECLARED_IMPLS   # the name tests use


def run_strategy(*args, **kwargs):
    """See `acf.methods.run_steps.run_strategy` (imported lazily: it pulls in torch)."""
    from acf.methods.run_steps import run_strategy as _run

    return _run(*args, **kwargs)


__all__ = ["StepContext", "StepRecord", "register", "get_impl", "run_strategy"]
