"""The fixed recipes: what a user would run by hand instead of acf, one strategy each, declared once.

Every claim acf makes is against the best of these at a size (the yardstick), so the list is the strongest set acf
can run for the run's output format, not a convenient one:
- compressed-tensors (llm-compressor): GPTQ W4 at each valid group size (32..128) with and without act-order,
  AWQ W4, AutoRound W4 and W3, GPTQ W3 act-order, GPTQ W8 per channel with act-order, SmoothQuant W8A8;
- GGUF (llama.cpp): Q3_K_M, IQ4_XS, Q4_K_M, Q5_K_M, Q6_K, Q8_0, each with the importance matrix.
Recipes whose shapes the model does not admit are left out (a group size that does not divide a layer, a GGUF
type that would fall back on every layer). `rtn_w4g<g>` is available by name (cheap, for tests and demos) but not
in the default set: no user would pick it over GPTQ.

Pure: names -> strategy dicts from the model spec and the run's calibration settings; measuring them is the
coordinator's (`acf.coordinator.yardstick`), and ranking them reads the frontier file (`FrontierFile.recipe_frontier`).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from acf.core.errors import AcfError

#: part of the recipe cache key: bump when a recipe's definition changes, so old measurements are not reused
RECIPES_VERSION = 1
#: the shape of every recipe name `available` can produce (checked before a run starts; which ones a model admits is
#: checked against its spec by `select`)
NAME_PATTERN = re.compile(r"^(gptq_w[348](g\d+)?(_ao)?|awq_w4g\d+|autoround_w[34]g\d+|rtn_w4g\d+|w8a8"
                          r"|gguf_[a-z0-9_]+_imat)$")
#: GGUF file types of the yardstick (each with the importance matrix)
GGUF_RECIPE_TYPES = ("Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def _groups(spec) -> list[int]:
    gs = [g for g in spec.valid_group_sizes if 32 <= g <= 128]
    return sorted(gs) or sorted(spec.valid_group_sizes)[-1:]


def available(spec, runtime: str, calib: dict[str, Any]) -> dict[str, dict]:
    """Every recipe this model admits for the runtime's format: name -> strategy dict ({"steps": [...]}), in the
    order they are measured (cheap first, so an interrupted yardstick has the common recipes)."""
    if runtime == "llamacpp":
        from acf.models.gguf_file import type_problems

        widths = spec.linear_widths(("lm_head",))
        return {f"gguf_{t.lower()}_imat": {"steps": [{"method": "gguf", "params": {"type": t, "imatrix": True,
                                                                                    **calib}}]}
                for t in GGUF_RECIPE_TYPES if not type_problems(t, widths, {})}
    gs = _groups(spec)
    g = max(gs)
    out: dict[str, dict] = {}

    def add(name: str, method: str, **params: Any) -> None:
        out[name] = {"steps": [{"method": method, "params": params}]}

    for grp in sorted(gs, reverse=True):
        add(f"gptq_w4g{grp}", "gptq", bits=4, group_size=grp, act_order=False, **calib)
        add(f"gptq_w4g{grp}_ao", "gptq", bits=4, group_size=grp, act_order=True, **calib)
    add(f"gptq_w3g{g}_ao", "gptq", bits=3, group_size=g, act_order=True, **calib)
    add("gptq_w8_ao", "gptq", bits=8, group_size=None, act_order=True, **calib)
    add("w8a8", "w8a8", **calib)
    add(f"awq_w4g{g}", "awq", bits=4, group_size=g, **calib)
    add(f"autoround_w4g{g}", "autoround", bits=4, group_size=g, **calib)
    add(f"autoround_w3g{g}", "autoround", bits=3, group_size=g, **calib)
    add(f"rtn_w4g{g}", "rtn", bits=4, group_size=g)
    return out


def default_names(spec, runtime: str) -> list[str]:
    """The yardstick a run measures unless told otherwise: every available recipe but RTN."""
    return [n for n in available(spec, runtime, {}) if not n.startswith("rtn_")]


def select(spec, runtime: str, calib: dict[str, Any], names: Optional[Sequence[str]]) -> dict[str, dict]:
    """The recipes a run measures: `names` (None: the default set; [] or ["none"]: none), each checked against what
    this model and runtime admit, with a clear error naming what is available."""
    avail = available(spec, runtime, calib)
    if names is None:
        return {n: avail[n] for n in default_names(spec, runtime)}
    wanted = [n for n in names if n and n != "none"]
    bad = [n for n in wanted if n not in avail]
    if bad:
        raise AcfError(f"--recipes: {', '.join(bad)} not available for this model and runtime; choose from "
                       f"{', '.join(avail)} (or 'none')")
    return {n: avail[n] for n in wanted}


def recipe_id(name: str) -> str:
    """A recipe's candidate id in the run (apart from episode ids c001...)."""
    return f"r:{name}"
