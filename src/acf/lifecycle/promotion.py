"""promote / rollback: an adapter becomes active only if it wins and no guard category regresses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from acf.core.errors import AcfError
from acf.core.provenance import Measurement
from acf.lifecycle.deploy import deploy_link, export_adapter, parse_export, point_deploy_link
from acf.lifecycle.evaluation import AdapterEval, resolve_adapter_dir
from acf.lifecycle.registry import PromotionRefused, open_registry
from acf.lifecycle.training import keep_last_adapters


MIN_GAIN = 0.05


def promote_adapter(adapter: str | Path, min_gain: float = MIN_GAIN, registry_path=None, force: bool = False,
                    reason: str = "", export: Optional[str] = None):
    """Make the adapter active if its held-out score beats the base by `min_gain` and no guard group regresses.

    `export` ("gguf:Q4_K_M"): also merge it into its base, export that to GGUF (acf.lifecycle.deploy), record the file
    in the registry entry and point the base's deploy link at it; the export runs before the registry changes, so a
    failed export promotes nothing."""
    gguf_type = parse_export(export)
    adir = resolve_adapter_dir(adapter, registry_path)
    if not (adir / "eval.json").is_file():
        raise AcfError(f"{adir}: not evaluated yet (run `acf distill eval --adapter {adapter}` first)")
    ev = AdapterEval.model_validate_json((adir / "eval.json").read_text())
    held = ev.group("heldout")
    reasons = []
    if held is None:
        reasons.append("eval.json has no held-out group")
    elif held.delta < min_gain - 1e-12:
        reasons.append(f"held-out score {held.adapted:.3f} vs base {held.base:.3f}: gain {held.delta:+.3f} < "
                       f"{min_gain:+.3f}")
    for g in ev.groups:
        if g.group.startswith("guard:") and g.delta < 0:
            reasons.append(f"{g.group} regresses: {g.adapted:.3f} vs base {g.base:.3f}")
    if reasons and not force:
        raise PromotionRefused(reasons)
    if force and not reason.strip():
        raise AcfError("--force needs --reason (it is recorded in the registry log)")
    ms = {f"score_{g.group.replace(':', '_')}": Measurement(value=g.adapted, unit="score", device=ev.device,
                                                            runtime=ev.runtime, n=g.n,
                                                            method=f"mean {ev.scorer} score of adapted generations",
                                                            extra={"base": g.base, "delta": g.delta})
          for g in ev.groups}
    gguf_file = None
    if gguf_type:
        meta = json.loads((adir / "metrics.json").read_text())
        gguf_file = export_adapter(adir, Path(meta["base_model"]), gguf_type) / "model.gguf"
    with open_registry(registry_path) as reg:
        e = reg.find_path(adir)
        if e is None:
            raise AcfError(f"{adir} is not in the registry {reg.path} (train registers adapters; use "
                           f"`acf registry add-model {adir} --kind adapter --parent BASE_ID`)")
        e.metrics.update(ms)
        if gguf_file is not None:
            base = reg.get(e.parent) if e.parent else None
            e.source["gguf_export"] = {"type": gguf_type, "path": str(gguf_file), "runtime": "llama.cpp",
                                       "bytes": gguf_file.stat().st_size}
            point_deploy_link(deploy_link(base.name if base else "model"), gguf_file)
        reg.set_active(e, "force" if force else "promote", reason if force else
                       f"held-out {held.adapted:.3f} vs base {held.base:.3f} (gain {held.delta:+.3f} >= {min_gain:g}); "
                       f"no guard regression")
        return e


def rollback_adapter(ref: str, registry_path=None):
    """Restore an earlier adapter as active, then keep only the last 3 adapters."""
    with open_registry(registry_path) as reg:
        e = reg.get(ref)
        target, prev = reg.rollback("adapter", to=e.id)
        # the deploy link follows: the restored adapter's GGUF, or none (never the rolled-back one's)
        base = reg.get(target.parent) if target.parent else None
        link = deploy_link(base.name if base else "model")
        exp = (target.source or {}).get("gguf_export")
        if exp and Path(exp["path"]).is_file():
            point_deploy_link(link, Path(exp["path"]))
        elif link.is_symlink():
            link.unlink()
        pruned = keep_last_adapters(reg)
        return target, prev, pruned
