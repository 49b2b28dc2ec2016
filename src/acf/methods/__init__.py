"""Compression methods. Each implementation takes (params, in_dir, out_dir, ctx) and writes a loadable model into
out_dir (a temporary directory renamed into place only on success); it returns extra facts for the record.

Methods are declared in `acf.methods.registry` (one `MethodSpec` each, implementation included)."""

from __future__ import annotations

from .base import MethodFn, StepContext, StepRecord

#: implementations run as steps without being declared methods (tests drive `run_strategy` with them); a declared
#: method's implementation is its MethodSpec.impl
_IMPL: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Run `target` ("module:function") for steps named `name` without declaring a method (no validation, search
    or card): for tests. Declare real methods with `acf.methods.registry.register(MethodSpec(...))`."""
    _IMPL[name] = target


def get_impl(name: str) -> MethodFn:
    import importlib

    from .registry import get

    spec = get(name)
    target = spec.impl if spec is not None else _IMPL.get(name)
    if target is None:
        from ..errors import MethodFailed

        raise MethodFailed(name, "unavailable", f"no implementation registered for {name!r}")
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def run_strategy(*args, **kwargs):
    """See `acf.methods.runner.run_strategy` (imported lazily: it pulls in torch)."""
    from .runner import run_strategy as _run

    return _run(*args, **kwargs)


__all__ = ["StepContext", "StepRecord", "register", "get_impl", "run_strategy"]
