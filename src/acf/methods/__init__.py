"""Compression methods. Each registered function takes (params, in_dir, out_dir, ctx) and writes a loadable model
into out_dir (a temporary directory renamed into place only on success); it returns extra facts for the record."""

from __future__ import annotations

from .base import MethodFn, StepContext, StepRecord

_IMPL: dict[str, str] = {
    # name -> "module:function"; modules are imported only when a step runs (they pull in heavy libraries)
    **{m: f"acf.methods.quantize:{m}" for m in ("gptq", "awq", "rtn", "autoround", "w8a8", "bnb_int8", "bnb_nf4")},
    **{m: f"acf.methods.prune:{m}" for m in ("magnitude", "wanda", "sparsegpt", "drop_layers")},
    "distill": "acf.methods.distill:distill",
    "lora": "acf.methods.lora:lora",
    "gguf": "acf.methods.gguf_export:gguf",
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


def run_strategy(*args, **kwargs):
    """See `acf.methods.runner.run_strategy` (imported lazily: it pulls in torch)."""
    from .runner import run_strategy as _run

    return _run(*args, **kwargs)


__all__ = ["StepContext", "StepRecord", "register", "get_impl", "run_strategy"]
