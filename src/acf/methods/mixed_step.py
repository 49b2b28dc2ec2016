"""The mixed-precision part of a quantization step: sensitivity (cached) -> allocation -> facts for the record.

Kept apart from `mixed.py` (formats, sizes, knapsack, estimators: no knowledge of steps) and from `quantize.py`
(recipes): this module is the glue that knows about step parameters, calibration text and the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from acf.core.errors import MethodFailed
from acf.core.instruments import weight_files_size
from acf.methods.base import StepContext
from acf.methods.calibration import calibration_facts, calibration_ids, calibration_name, general_count
from acf.methods.model_io import report, stored_dtype
from acf.models.loading import cache_dir
from acf.methods.mixed import (KEEP, Allocation, LayerShape, allocate, default_formats, effective_bits,
                               fisher_sensitivity, layer_bytes, parse_format, shapes_of, target_palette)
from acf.methods.deploy_check import check_vllm, verdict
from acf.methods.sensitivity_cache import cached_sensitivity, sensitivity_key, weights_digest
from acf.methods.vllm_rules import fused_key, group_problems, wna16_problem


def _dense_bytes(in_dir: Path) -> int:
    dt = stored_dtype(in_dir)
    return dt.itemsize if dt is not None else 2


def palette(params: dict, shapes: list[LayerShape]) -> list[str]:
    """The formats a step may allocate: its `formats`, or the default palette for the layers' widths, less the
    formats its target cannot serve (target "vllm": 3-bit, for one; validation refuses them in `formats`)."""
    if params.get("formats"):
        return list(params["formats"])
    widths = {s.in_features for s in shapes}
    valid = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths)]
    return target_palette(default_formats(valid), params.get("target") or "vllm")


def replay_problems(layer_formats: dict[str, str], shapes: list[LayerShape], family: Optional[str]) -> list[str]:
    """Why a given allocation cannot load in vLLM (target "vllm"): a fused layer whose members differ in format, or
    a format vLLM's kernels do not serve on the fused shape. Pure; one line per fused layer."""
    from acf.methods.mixed import items

    out = []
    for members in items([s for s in shapes if s.name in layer_formats], "vllm", family):
        names = [m.name for m in members]
        key = fused_key(names[0], family)
        split = group_problems(names, layer_formats)
        if split:
            out.append(f"{key}: {split}")
            continue
        f = parse_format(layer_formats[names[0]])
        if f.keep:
            continue
        n = sum(m.out_features for m in members)
        why = next((w for m in members if (w := wna16_problem(f.bits, f.group, m.in_features, n))), None)
        if why:
            out.append(f"{key} ({f.name}): {why}")
    return out


def allocation_for(model, tok, params: dict, in_dir: Path, ctx: StepContext, method: str) -> tuple[Allocation, dict]:
    """The per-layer formats of this step: `layer_formats` as given (a replayed allocation), or allocated for
    `avg_bits` from the Fisher sensitivity of `in_dir` on the task's calibration windows (cached)."""
    ignore = list(params.get("ignore") or [])
    shapes = shapes_of(model, ignore)
    dense = _dense_bytes(in_dir)
    target = params.get("target") or "vllm"
    family = getattr(getattr(model, "config", None), "model_type", None)
    given = params.get("layer_formats")
    if given:
        names = {s.name for s in shapes}
        missing, unknown = sorted(names - set(given)), sorted(set(given) - names)
        if missing or unknown:
            raise MethodFailed(method, "config", f"layer_formats must name every quantizable layer of the input: "
                                                 f"{len(missing)} missing (e.g. {missing[:2]}), {len(unknown)} unknown "
                                                 f"(e.g. {unknown[:2]})")
        by = {s.name: s for s in shapes}
        nbytes = sum(layer_bytes(parse_format(f), by[n].out_features, by[n].in_features, dense, n)
                     for n, f in given.items())
        counts: dict[str, int] = {}
        for f in given.values():
            counts[f] = counts.get(f, 0) + 1
        eff = effective_bits(shapes, given, dense)
        alloc = Allocation(layer_formats={s.name: given[s.name] for s in shapes}, budget_bits=round(eff, 4),
                           effective_bits=round(eff, 4), predicted_bytes=nbytes, sensitivity_total=float("nan"),
                           counts=counts)
        bad = replay_problems(given, shapes, family) if target == "vllm" else []
        if bad:
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise MethodFailed(method, "config", f"layer_formats cannot load in vLLM (target vllm): "
                                                 f"{'; '.join(bad[:3])}{more}; give target 'transformers' to keep them")
        facts: dict[str, Any] = {"source": "layer_formats (replayed)"}
    else:
        formats = palette(params, shapes)
        n, L = int(params.get("sensitivity_samples") or 16), int(params.get("sensitivity_seq_len") or 512)
        task = calibration_name(ctx.task)   # with a --calib-data file, its digest too
        key = sensitivity_key(weights_digest(in_dir), task, n, L, ctx.seed, formats, ignore,
                              general_count(n, ctx.calib_mix, method))

        def compute():
            ids = calibration_ids(tok, ctx.task, n, L, ctx.seed, method, ctx.calib_mix)
            return fisher_sensitivity(model, ids, formats, ignore, seed=ctx.seed,
                                      progress=lambda d, t: report(ctx, "sensitivity", d, t))

        cache, hit = cached_sensitivity(cache_dir() / "sensitivity", key, compute, task=task, n=n, seq_len=L)
        try:
            alloc = allocate(shapes, cache.scores, formats, float(params["avg_bits"]), dense, target, family)
        except ValueError as e:
            raise MethodFailed(method, "config", str(e)) from None
        facts = {"source": f"allocated for avg_bits={params['avg_bits']}",
                 "sensitivity": {"estimator": cache.estimator, "samples": n, "seq_len": L, "cache_hit": hit,
                                 "seconds": cache.seconds, "key": key,
                                 **calibration_facts(ctx.task, n, ctx.calib_mix, method,
                                                     " (evaluation's prompt format)")},
                 "formats": formats}
    kept_dense = sum(layer_bytes(parse_format(KEEP), s.out_features, s.in_features, dense, s.name) for s in shapes)
    facts.update(target=target, allocation=alloc.model_dump(),
                 predicted_weight_file_bytes=weight_files_size(in_dir) - kept_dense + alloc.predicted_bytes)
    return alloc, facts


def record_measured_size(facts: dict, out_dir: Path) -> None:
    """Put the measured size of the written weight files beside the prediction (the budget is met on disk)."""
    measured = weight_files_size(out_dir)
    facts["measured_weight_file_bytes"] = measured
    pred = facts.get("predicted_weight_file_bytes")
    if pred:
        facts["size_prediction_error"] = round((pred - measured) / measured, 5)


def record_deploy_check(facts: dict, out_dir: Path, method: str) -> None:
    """Check the written model against vLLM's loader rules (acf.methods.deploy_check) and put the verdict in the
    facts: every mixed-precision output says whether it conforms, as "checked by rules", never "loads" (vLLM is not
    run). Under target "vllm" a violation is acf's own error (the allocator gives one servable format per fused
    layer), so the step fails rather than record a model it promised vLLM could serve."""
    found = check_vllm(out_dir)
    facts["deploy_check"] = verdict(found)
    if found and facts.get("target") == "vllm":
        raise MethodFailed(method, "deploy", f"the output breaks {len(found)} vLLM loader rule(s) although its "
                                             f"target is vllm: {'; '.join(str(v) for v in found[:3])}")
