"""Compression methods. Each registered function takes (params, in_dir, out_dir, ctx) and writes a loadable model
into out_dir (a temporary directory renamed into place only on success); it returns extra facts for the record."""

from __future__ import annotations

from .base import MethodFn, StepContext, StepRecord

_IMPL: dict[str, str] = {
    # filled by the method modules: name -> "module:function"
}


def register(name: str, target: str) -> None:
    _IMPL[name] = target


def get_impl(name: str) -> MethodFn:
    import importlib

    if name not in _IMPL:
        from ..errors import MethodFailed

        raise MethodFailed(name, "unavailable", f"no implementation registered for {name!r}")
    mod, _, fn = _IMPL[name].partition(":")
    return getattr(importlib.import_module(mod), fn)


__all__ = ["StepContext", "StepRecord", "register", "get_impl"]
