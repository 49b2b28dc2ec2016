"""Before an episode runs: its estimated cost (shown at approval) and whether it fits (preflight: disk, and each
step's peak memory from acf.methods.memory against the device's free memory)."""

from __future__ import annotations

import shutil
from typing import Optional

from acf.coordinator.run_context import RunContext
from acf.methods.strategy import Strategy

def estimate_cost(ctx: RunContext, strategy: Strategy) -> dict:
    """A rough estimate (not a measurement) of an episode's cost, shown before approval and read by preflight: the
    registry's cost model per step (the same one the `estimate_cost` tool reports)."""
    from acf.methods.registry import estimate_step_seconds

    spec = ctx.spec
    secs = sum(estimate_step_seconds(s.method, s.params, spec.params, ctx.cfg.device) for s in strategy.steps)
    base_size = (ctx.ff.baseline.metrics["size"].value if ctx.ff and ctx.ff.baseline and "size" in ctx.ff.baseline.metrics
                 else spec.params * 2)
    mem = memory_estimates(ctx, strategy)
    worst = max(mem, key=lambda e: e.total) if mem else None
    return {"estimated_compress_seconds": round(secs, 1), "estimated_peak_disk_bytes": int(base_size * 2.2),
            "estimated_peak_memory_bytes": worst.total if worst else None,
            "peak_memory_step": worst.describe() if worst else None,
            "how": "estimated from parameter count and step settings (not measured)"}


def memory_estimates(ctx: RunContext, strategy: Strategy) -> list:
    """Each step's estimated peak memory on the run's device (acf.methods.memory), from the input model's shapes."""
    from acf.methods.memory import Shape
    from acf.methods.registry import estimate_step_memory

    shape = Shape.of(ctx.spec)
    ests = [estimate_step_memory(s.method, s.params, shape, ctx.cfg.device) for s in strategy.steps]
    return [e for e in ests if e is not None]


def free_memory(device: str) -> tuple[int, str]:
    """Bytes a step may still allocate on `device`, and what was read."""
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        free_b, _ = torch.cuda.mem_get_info(dev)
        # memory this process's allocator caches but no tensor uses is free for the step too
        free_b += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free_b), f"GPU memory ({device})"
    import psutil

    return int(psutil.virtual_memory().available), "RAM"


def preflight(ctx: RunContext, strategy: Strategy, free_bytes: Optional[int] = None) -> Optional[str]:
    """Will the episode fit? Returns a refusal reason naming the figures it used, or None. `free_bytes` replaces
    the device's free memory (tests; a user's own limit)."""
    from acf.methods.memory import refusal

    est = estimate_cost(ctx, strategy)
    need_disk = ctx.cfg.min_free_disk_bytes or est["estimated_peak_disk_bytes"] + 200 * 2**20
    free = shutil.disk_usage(ctx.dir).free
    if free < need_disk:
        return (f"disk: {free / 2**30:.2f} GiB free under {ctx.dir}, the episode needs about "
                f"{need_disk / 2**30:.2f} GiB (estimate)")
    if free_bytes is None:
        free_bytes, where = free_memory(ctx.cfg.device)
    else:
        where = "GPU memory" if ctx.cfg.device.startswith("cuda") else "RAM"
    return refusal(memory_estimates(ctx, strategy), free_bytes, where)
