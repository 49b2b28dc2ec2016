"""The yardstick: the fixed recipes are measured once per model/task/items/calibration (cached, reused on resume and
by later runs), the headline compares acf with the BEST recipe at each size (not the weakest), with paired intervals."""

from __future__ import annotations

import json

import pytest

from acf.coordinator.state import Candidate, FrontierFile, RunMeta
from acf.core.provenance import Measurement
from acf.core.stats import paired_ratio, per_item
from acf.methods.strategy import Step, Strategy

MiB = 2 ** 20


def _items(sums: list[float]) -> dict:
    return per_item([f"i{k}" for k in range(len(sums))], sums, [10] * len(sums))


def _cand(cid: str, method: str, kld: float, size_mib: float, sums=None, by: str = "optuna:tpe", **params) -> Candidate:
    s = Strategy(steps=[Step(method=method, params=params)])
    k = Measurement(value=kld, unit="nats/token", method="test", extra={"per_item": _items(sums)} if sums else {})
    return Candidate(id=cid, episode=0, strategy=s, proposed_by=by,
                     metrics={"kld": k, "size": Measurement(value=size_mib * MiB, unit="bytes")})


def _ff(recipes: list[Candidate], candidates: list[Candidate]) -> FrontierFile:
    meta = RunMeta(run_id="r", model="m", model_path="/m", dataset="gsm8k", objectives=["kld", "size"],
                   directions={}, preset="balanced", min_retention=None, sampler="tpe", seed=0, limit=4,
                   proxy_limit=None, episodes=1, device="cpu", acf_version="0", git_commit=None, runtime="t",
                   created_at="", updated_at="")
    return FrontierFile(run=meta, spec={}, recipes=recipes, candidates=candidates)


def test_the_headline_names_the_best_recipe_at_each_size_not_the_weakest():
    """At W4 size AutoRound beats GPTQ act-order (as measured on the default model): the headline must compare acf
    with AutoRound; GPTQ W3 (smaller) and W8 (larger) are the frontier's other sizes."""
    from acf.reports.headline import headline, headline_section

    recipes = [_cand("r:gptq_w4g64_ao", "gptq", 0.131, 111.3, [0.13] * 8), _cand("r:autoround_w4g64", "autoround",
               0.042, 111.3, [0.04, 0.05, 0.03, 0.04, 0.05, 0.04, 0.04, 0.045]),
               _cand("r:awq_w4g64", "awq", 0.155, 112.1), _cand("r:gptq_w3g64_ao", "gptq", 0.73, 98.6),
               _cand("r:gptq_w8_ao", "gptq", 0.0025, 159.0)]
    acf = _cand("c001", "autoround", 0.03, 111.1, [0.03, 0.04, 0.02, 0.03, 0.04, 0.03, 0.03, 0.02], avg_bits=4.25)
    ff = _ff(recipes, [acf])
    assert [r.id for r in ff.recipe_frontier()] == ["r:gptq_w3g64_ao", "r:autoround_w4g64", "r:gptq_w8_ao"]
    assert ff.best_recipe_at(111.3 * MiB).id == "r:autoround_w4g64"
    assert ff.best_recipe_at(112.5 * MiB).id == "r:autoround_w4g64"     # AWQ is larger and worse
    assert ff.best_recipe_at(90 * MiB) is None
    rows = {h["recipe"]: h for h in headline(ff)}
    w4 = rows["r:autoround_w4g64"]
    assert w4["acf"] == "c001"
    cmp = w4["comparisons"]["kld, search items"]
    assert cmp["ratio"] == pytest.approx(sum([0.03, 0.04, 0.02, 0.03, 0.04, 0.03, 0.03, 0.02]) /
                                         sum([0.04, 0.05, 0.03, 0.04, 0.05, 0.04, 0.04, 0.045]))
    assert cmp["ci95"][0] <= cmp["ratio"] <= cmp["ci95"][1]
    assert rows["r:gptq_w3g64_ao"]["acf"] is None          # acf has nothing that small: said, not hidden
    md = "\n".join(headline_section(ff))
    assert "`autoround_w4g64` (111.3 MiB)" in md and "acf's best at no larger size" in md
    assert ff.headline_ids() == ["r:gptq_w3g64_ao", "r:autoround_w4g64", "c001", "r:gptq_w8_ao"]
    # a recipe whose output breaks vLLM's rules (3-bit) is named as one a vLLM user cannot pick
    from acf.methods.base import StepRecord

    ff.recipes[3].steps = [StepRecord(method="gptq", params={}, extra={"deploy_check": {"conforms": False}})]
    ff.recipes[4].steps = [StepRecord(method="gptq", params={}, extra={"deploy_check": {"conforms": True}})]
    md = "\n".join(headline_section(ff))
    assert "vLLM would refuse `gptq_w3g64_ao`" in md and "`gptq_w8_ao`" not in md.split("vLLM would refuse")[1]


def test_paired_ratio_pairs_items_and_refuses_other_items():
    a, b = _items([1.0, 2.0, 3.0, 4.0]), _items([2.0, 4.0, 6.0, 8.0])
    r, (lo, hi) = paired_ratio(a, b)
    assert r == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # same ratio per item
    other = per_item(["x0", "x1", "x2", "x3"], [1.0, 2.0, 3.0, 4.0], [10] * 4)
    assert paired_ratio(a, other) is None and paired_ratio(None, b) is None
    noisy = paired_ratio(_items([1.0, 3.0, 2.0, 5.0, 1.0]), _items([2.0, 2.0, 4.0, 4.0, 3.0]))
    assert noisy[1][0] < noisy[0] < noisy[1][1]


def test_recipe_names_are_checked_against_the_model(tiny_model_dir):
    from acf.core.errors import AcfError
    from acf.models.spec import infer_spec
    from acf.search.recipes import NAME_PATTERN, available, default_names, select

    spec = infer_spec(tiny_model_dir)
    names = default_names(spec, "transformers")
    assert "autoround_w4g64" in names and "gptq_w4g64_ao" in names and "gptq_w4g32" in names
    assert not any(n.startswith("rtn") for n in names) and all(NAME_PATTERN.match(n) for n in available(spec, "t", {}))
    with pytest.raises(AcfError, match="gptq_w4g128"):
        select(spec, "transformers", {}, ["gptq_w4g128"])       # 64-wide layers: no group of 128
    assert select(spec, "transformers", {}, ["none"]) == {}


@pytest.mark.slow
def test_recipes_are_measured_once_reused_on_resume_and_by_a_later_run(tiny_model_dir, data_root, tmp_path,
                                                                        monkeypatch):
    from test_pipeline import cfg_for, quiet

    from acf.coordinator import yardstick
    from acf.coordinator.single_process import Pipeline, load_run_config, run_in_terminal
    from acf.coordinator.state import load_frontier_file

    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    kw = dict(episodes=1, recipes=["rtn_w4g64", "gptq_w4g64"], objectives=["kld", "size"])
    run_in_terminal(cfg_for(tiny_model_dir, tmp_path / "a", **kw), quiet())
    ff = load_frontier_file(tmp_path / "a")
    assert [r.id for r in ff.recipes] == ["r:rtn_w4g64", "r:gptq_w4g64"] or \
        {r.id for r in ff.recipes} == {"r:rtn_w4g64", "r:gptq_w4g64"}
    assert all(r.status == "ok" and r.metrics["kld"].value > 0 for r in ff.recipes)
    cached = sorted(p.name for p in (tmp_path / "cache" / "recipes").glob("*/*.json"))
    assert cached == ["gptq_w4g64.json", "rtn_w4g64.json"]

    def refuse(*a, **k):
        raise AssertionError("a recipe was measured again")

    monkeypatch.setattr(yardstick, "measure_recipe", refuse)
    # resume: the recipes are in the run's store, nothing is measured (the cache is not even needed)
    cfg = load_run_config(tmp_path / "a")
    cfg.run_dir, cfg.episodes = str(tmp_path / "a"), 2
    p = Pipeline(cfg, quiet(), resume=True)
    assert p.start() is None
    p.close()
    # a later run with the same model, task, items and calibration reads them from the cache
    run_in_terminal(cfg_for(tiny_model_dir, tmp_path / "b", **kw), quiet())
    fb = load_frontier_file(tmp_path / "b")
    assert {r.id: r.metrics["kld"].value for r in fb.recipes} == {r.id: r.metrics["kld"].value for r in ff.recipes}
    # another calibration is another yardstick: measured again (here refused, so it fails loudly)
    with pytest.raises(AssertionError, match="measured again"):
        run_in_terminal(cfg_for(tiny_model_dir, tmp_path / "c", calib_samples=8, **kw), quiet())
    rec = json.loads(next((tmp_path / "cache" / "recipes").glob("*/gptq_w4g64.json")).read_text())
    assert rec["key_parts"]["calibration"]["samples"] == 4 and rec["key_parts"]["task"] == "gsm8k"
