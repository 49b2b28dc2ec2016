"""Before an episode runs: its estimated cost (shown at approval) and whether it fits (preflight: disk, and each
step's peak memory from acf.methods.memory against the device's free memory)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Optional

from acf.coordinator.run_context import RunContext
from acf.methods.strategy import Strategy


@dataclass
class StepEstimate:
    """One step's estimated wall seconds and peak memory (an Estimate of acf.methods.memory, or None where the
    method has no memory model): what `acf run --dry-run` prints per step, and what estimate_cost sums."""

    method: str
    seconds: float
    memory: Optional[Any]


def step_estimates(ctx: RunContext, strategy: Strategy) -> list[StepEstimate]:
    """Each step's estimates from the registry's cost and memory models (not measurements), on the run's device."""
    from acf.methods.memory import Shape
    from acf.methods.registry import estimate_step_memory, estimate_step_seconds

    spec, device = ctx.spec, ctx.cfg.device
    shape = Shape.of(spec)
    return [StepEstimate(s.method, estimate_step_seconds(s.method, s.params, spec.params, device),
                         estimate_step_memory(s.method, s.params, shape, device)) for s in strategy.steps]


def estimate_cost(ctx: RunContext, strategy: Strategy) -> dict:
    """A rough estimate (not a measurement) of an episode's cost, shown before approval and read by preflight: the
    registry's cost model per step (the same one the `estimate_cost` tool reports)."""
    spec = ctx.spec
    steps = step_estimates(ctx, strategy)
    secs = sum(e.seconds for e in steps)
    base_size = (ctx.ff.baseline.metrics["size"].value if ctx.ff and ctx.ff.baseline and "size" in ctx.ff.baseline.metrics
                 else spec.params * 2)
    mem = [e.memory for e in steps if e.memory is not None]
    worst = max(mem, key=lambda e: e.total) if mem else None
    return {"estimated_compress_seconds": round(secs, 1), "estimated_peak_disk_bytes": int(base_size * 2.2),
            "estimated_peak_memory_bytes": worst.total if worst else None,
            "peak_memory_step": worst.describe() if worst else None,
            "how": "estimated from parameter count and step settings (not measured)"}


def memory_estimates(ctx: RunContext, strategy: Strategy) -> list:
    """Each step's estimated peak memory on the run's device (acf.methods.memory), from the input model's shapes."""
    return [e.memory for e in step_estimates(ctx, strategy) if e.memory is not None]


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
