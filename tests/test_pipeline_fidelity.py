"""A run measures fidelity to its baseline: cached references reused on resume, held-out report items, control rows
for recovery steps, and an evaluation failure that fails one episode only (tiny random-init Llama)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from rich.console import Console

from acf.coordinator.run_context import RunConfig
from acf.coordinator.single_process import Pipeline, run_in_terminal
from acf.coordinator.state import load_frontier_file

FAST = dict(limit=4, proxy_limit=None, calib_samples=4, seq_len=64, recover_steps=[2], tune_steps=[2],
            latency_tokens=4, min_retention=None, quant_methods=["none", "rtn"], prune_methods=["none", "drop_layers"],
            skip_sanity=True,   # a random-init model is broken by design (the check: test_architectures.py)
            recipes=["rtn_w4g64"])   # the yardstick's cheapest recipe


def console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=160), buf


def _cfg(model_dir: Path, run_dir: Path, **kw) -> RunConfig:
    args = dict(FAST)
    args.update(kw)
    return RunConfig(model=str(model_dir), run_dir=str(run_dir), **args)


@pytest.fixture(scope="module")
def fid_run(tiny_model_dir, data_root, tmp_path_factory) -> Path:
    """Two episodes chosen through approval edits: RTN W8, and drop 1 block -> LoRA 2 steps (which gets a control)."""
    run_dir = tmp_path_factory.mktemp("fid") / "run"
    con, _ = console()
    pipe = Pipeline(_cfg(tiny_model_dir, run_dir, episodes=2, interactive=True, objectives=["kld", "size"],
                         final_limit=3, final_metrics=["answer_nll"]), con)
    pipe.start()
    pipe.resume({"action": "edit", "strategy": {"steps": [{"method": "rtn", "params": {"bits": 8,
                                                                                     "group_size": 32}}]}})
    pipe.resume({"action": "edit", "strategy": {"steps": [
        {"method": "drop_layers", "params": {"count": 1, "by": "first"}},
        {"method": "lora", "params": {"steps": 2, "batch_size": 2, "seq_len": 64, "samples": 8}}]}})
    pipe.close()
    return run_dir


def test_run_measures_fidelity_on_search_items_and_reports_on_held_out_ones(fid_run):
    ff = load_frontier_file(fid_run / "frontier.json")
    assert ff.run.objectives == ["kld", "size"] and ff.run.max_kld == 0.5
    sets = ff.run.item_sets
    assert sets["search"]["offset"] == 0 and sets["search"]["count"] == 4
    assert sets["report"]["offset"] == 4 and sets["report"]["count"] == 3
    b = ff.baseline
    assert abs(b.metrics["kld"].value) <= 1e-6 and b.metrics["top1"].value == 1.0
    assert [c.status for c in ff.candidates] == ["ok", "ok"]
    for c in [b] + ff.candidates:
        for m in ("kld", "top1", "kld_general", "answer_nll"):
            assert c.metrics[m].value is not None, (c.id, m)
        assert c.metrics["kld"].extra["items"]["offset"] == 0 and c.metrics["kld"].n == 4
    assert all(c.metrics["kld"].value > 0 for c in ff.candidates)
    finals = [ff.candidate(i) for i in ["baseline"] + ff.frontier if i != "baseline"]
    for c in finals:
        assert c.final_metrics["kld"].extra["items"]["offset"] == 4 and c.final_metrics["kld"].n == 3
        first_search = c.metrics["kld"].extra["items"]["first_id"]
        assert c.final_metrics["kld"].extra["items"]["first_id"] != first_search
    for name in ("task-search", "general-search", "task-report", "general-report"):
        assert (fid_run / "reference" / f"{name}.safetensors").is_file(), name
        assert (fid_run / "reference" / f"{name}.safetensors.json").is_file(), name


def test_recovery_steps_get_a_control_row(fid_run):
    ff = load_frontier_file(fid_run / "frontier.json")
    rtn, dropped = ff.candidates
    assert rtn.control is None
    assert dropped.control == "ctrl01" and len(ff.controls) == 1
    ctrl = ff.controls[0]
    assert [s.method for s in ctrl.strategy.steps] == ["lora"] and ctrl.strategy.steps[0].params["steps"] == 2
    assert ctrl.status == "ok" and ctrl.metrics["kld"].value is not None and ctrl.id not in ff.frontier
    from acf.reports.report import write_report

    text = write_report(fid_run).read_text()
    assert "task adaptation" in text.lower() and "ctrl01" in text
    # the search's own figures: predictions made before each episode, screened proposals, aims
    assert "## Search" in text and "Predicted vs measured kld" in text and "screened out by their prediction" in text


def test_resume_reuses_the_reference_and_rebuilds_a_corrupt_one(fid_run, tiny_model_dir):
    from acf.coordinator.single_process import load_run_config

    ref = fid_run / "reference" / "task-search.safetensors"
    before = ref.stat().st_mtime_ns
    cfg = load_run_config(fid_run)
    cfg.episodes, cfg.interactive = 3, False
    con, buf = console()
    run_in_terminal(cfg, con, resume=True)
    out = buf.getvalue()
    assert ref.stat().st_mtime_ns == before and "recomputing" not in out and "loading the baseline" not in out
    ff = load_frontier_file(fid_run / "frontier.json")
    assert len(ff.candidates) == 3
    # a truncated cache: named, recomputed, never read as zeros
    data = ref.read_bytes()
    ref.write_bytes(data[: len(data) // 3])
    cfg.episodes = 4
    con, buf = console()
    run_in_terminal(cfg, con, resume=True)
    out = buf.getvalue()
    assert "task-search.safetensors" in out and "recomputing" in out
    ff = load_frontier_file(fid_run / "frontier.json")
    c4 = ff.candidates[3]
    assert c4.status in ("ok", "failed", "pruned")
    if c4.status == "ok":
        assert c4.metrics["kld"].value > 0


def test_an_evaluation_failure_fails_one_episode_and_the_run_goes_on(tiny_model_dir, data_root, tmp_path,
                                                                      monkeypatch):
    import acf.evaluation.runner as R

    real = R.teacher_forced
    calls = {"n": 0}

    def flaky(model, tok, seqs, metrics, **kw):
        if kw.get("reference") is not None and model is not None and calls["n"] == 0 and _is_candidate(model):
            calls["n"] += 1
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tok, seqs, metrics, **kw)

    base_ids: set[int] = set()

    def _is_candidate(model) -> bool:
        return id(model) not in base_ids

    real_load = R.Loaded.load.__func__

    def load(cls, path, device, trust_remote_code=False):
        ld = real_load(cls, path, device, trust_remote_code)
        if Path(path).resolve() == Path(tiny_model_dir).resolve():
            base_ids.add(id(ld.model))
        return ld

    monkeypatch.setattr(R, "teacher_forced", flaky)
    monkeypatch.setattr(R.Loaded, "load", classmethod(load))
    con, _ = console()
    ctx = run_in_terminal(_cfg(tiny_model_dir, tmp_path / "run", episodes=2, objectives=["kld", "size"],
                               prune_methods=["none"]), con)
    st = [c.status for c in ctx.ff.candidates]
    assert st == ["failed", "ok"], [(c.status, c.reason) for c in ctx.ff.candidates]
    assert ctx.ff.candidates[0].reason.startswith("oom: evaluation failed")
    assert os.path.isdir(tmp_path / "run")
