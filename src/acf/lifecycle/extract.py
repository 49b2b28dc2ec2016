"""Student extraction: keep a share or number of a model's decoder blocks, optionally recover, register with lineage.

Block selection is delegated to the `drop_layers` method (keep k blocks = drop n - k), so extraction and the
search's depth pruning measure importance the same way (1 - cos(block input, block output) on calibration text
from the task's train split). Recovery (`distill` from the parent as teacher, or `lora`) runs as the next step
of the same strategy. The student is registered with its parent, and `acf registry compare PARENT STUDENT`
shows which of the parent's blocks it kept, by weight hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from acf.core.errors import AcfError
from acf.lifecycle.registry import open_registry
from acf.methods import StepContext, run_strategy
from acf.methods.strategy import validate_strategy
from acf.models.loading import resolve_device, resolve_model
from acf.models.spec import infer_spec
from acf.tasks import get_task

BY = {"importance": "importance", "layers": "last", "weight-range": "weight_range"}


class ExtractResult(BaseModel):
    out_dir: str
    layers_before: int
    kept_layers: list[int]
    dropped_layers: list[int]
    strategy: dict
    steps: list[dict]
    registry_id: Optional[str] = None
    parent_id: Optional[str] = None


def extract(model: str, out: str | Path, by: str = "importance", ratio: Optional[float] = None,
            layers: Optional[int] = None, recover: Optional[str] = None, steps: int = 50,
            weight_range: Optional[tuple[float, float]] = None, task: str = "gsm8k", calib_samples: int = 32,
            seq_len: int = 256, device: Optional[str] = None, seed: int = 0, register: bool = True,
            registry_path: Optional[str | Path] = None, overwrite: bool = False,
            recover_params: Optional[dict] = None) -> ExtractResult:
    """Keep `layers` blocks (or the share `ratio` of them) of `model`, chosen `by` importance / first-N / weight
    range; recover with `recover` for `steps` steps; write the student to `out` and register it.

    by=layers keeps the first N blocks (drops the last); by=weight-range drops blocks whose mean |W| lies in
    `weight_range`, at most n - k of them. `recover_params` adds parameters of the recovery step (lr, samples, ...).
    """
    import shutil

    if by not in BY:
        raise AcfError(f"--by {by!r}: choose from {', '.join(BY)}")
    if (ratio is None) == (layers is None) and by != "weight-range":
        raise AcfError("give exactly one of --ratio (share of blocks to keep) or --layers (blocks to keep)")
    if recover not in (None, "distill", "lora"):
        raise AcfError(f"--recover {recover!r}: choose distill or lora")
    if by == "weight-range" and weight_range is None:
        raise AcfError("--by weight-range needs --weight-range LO,HI (mean |W| of the blocks to drop)")
    src = resolve_model(model)
    spec = infer_spec(src)
    n = spec.num_layers
    if ratio is not None and not 0 < ratio < 1:
        raise AcfError(f"--ratio {ratio}: the share of blocks to keep must lie strictly between 0 and 1")
    k = layers if layers is not None else (max(1, round(ratio * n)) if ratio is not None else None)
    if k is not None and not 1 <= k < n:
        raise AcfError(f"keeping {k} of {n} blocks: keep at least 1 and fewer than {n}")
    out = Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise AcfError(f"--out {out} exists and is not empty: choose a new directory (or --overwrite)")
    dl: dict = {"by": BY[by], "calib_samples": calib_samples, "seq_len": seq_len}
    if k is not None:
        dl["count"] = n - k
    if weight_range is not None:
        dl["weight_range"] = list(weight_range)
    raw = [{"method": "drop_layers", "params": dl}]
    if recover:
        raw.append({"method": recover, "params": {**(recover_params or {}), "steps": steps}})
    dev = resolve_device(device)
    strat = validate_strategy({"steps": raw}, spec, dev)
    t = get_task(task)
    if out.exists():
        shutil.rmtree(out)
    ctx = StepContext(device=dev, task=t, teacher_dir=src, seed=seed)
    records = run_strategy(strat, src, out, ctx)
    bad = [r for r in records if r.status != "ok"]
    if bad or not records:
        r = bad[0] if bad else None
        raise AcfError(f"extraction failed at {r.method if r else 'start'}: {r.reason if r else 'no step ran'}"
                       + (f" (log: {r.log_path})" if r and r.log_path else ""))
    dropped = list(records[0].extra.get("dropped_layers", []))
    kept = [i for i in range(n) if i not in set(dropped)]
    info = {"kept_layers": kept, "dropped_layers": dropped, "layers_before": n, "by": by,
            **{k_: v for k_, v in records[0].extra.items() if k_ in ("importance", "importance_measure",
                                                                      "block_mean_abs_weight")}}
    (out / "ACF_EXTRACT.json").write_text(json.dumps({**info, "parent": str(src),
                                                       "strategy": strat.model_dump()}, indent=2))
    res = ExtractResult(out_dir=str(out), layers_before=n, kept_layers=kept, dropped_layers=dropped,
                        strategy=strat.model_dump(), steps=[r.model_dump() for r in records])
    if register:
        from acf.evaluation.perf import size_metric

        with open_registry(registry_path, create=True) as reg:
            parent = reg.find_path(src)
            if parent is None:
                parent, _ = reg.add_entry(kind="base", path=src, name=model if not Path(model).exists()
                                          else Path(model).name)
            e, _ = reg.add_entry(kind="student", path=out, name=f"{parent.name}-student-{len(kept)}of{n}",
                                 parent=parent.id, strategy=strat, metrics={"size": size_metric(out)},
                                 source={**info, "steps": [r.model_dump() for r in records]})
            res.registry_id, res.parent_id = e.id, parent.id
    return res
