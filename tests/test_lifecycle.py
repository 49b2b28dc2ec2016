"""Lifecycle: report + notebook over a frontier file, registry, adapter loop, student extraction.

Frontier files here are made by the test (the report must render any valid file); models are real (tiny
random-init Llamas with the default model's tokenizer) and every number checked is measured from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from acf.errors import AcfError
from acf.objectives import DIRECTIONS
from acf.pareto import hypervolume, pareto_front, reference_point
from acf.provenance import Measurement
from acf.reward import recommend, retention, reward
from acf.state import SCHEMA_VERSION, Candidate, FrontierFile, HVPoint, Recommendation, RunMeta, now, save_frontier_file
from acf.strategy import Strategy

ROOT = Path(__file__).resolve().parents[1]
OBJS = ["accuracy", "size", "answer_nll"]

# (id, status, steps, accuracy, size bytes, answer_nll, reason, timings)
_CANDS = [
    ("baseline", "ok", [], 0.30, 100e6, 1.00, None, {"evaluate": 10.0}),
    ("e1", "ok", [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}], 0.28, 40e6, 1.05, None,
     {"compress": 3.0, "evaluate": 8.0}),
    ("e2", "ok", [{"method": "drop_layers", "params": {"count": 2, "by": "importance"}}], 0.20, 80e6, 1.40, None,
     {"compress": 5.0, "evaluate": 9.0}),
    ("e3", "ok", [{"method": "gptq", "params": {"bits": 8, "group_size": 64}}], 0.31, 60e6, 1.01, None,
     {"compress": 20.0, "evaluate": 8.0}),
    ("e4", "failed", [{"method": "awq", "params": {"bits": 4}}], None, None, None, "awq failed (no_cuda): needs CUDA",
     {"compress": 0.5}),
    ("e5", "pruned", [{"method": "magnitude", "params": {"sparsity": 0.9}}], None, None, None,
     "proxy accuracy 0.01 cannot reach the frontier", {"compress": 1.0, "proxy_evaluate": 2.0}),
]


def make_frontier(run_dir: Path, run_id: str = "test-run") -> FrontierFile:
    """A schema-valid frontier.json whose frontier, hypervolume and pick are computed by acf's own functions."""
    units = {"accuracy": "fraction", "size": "bytes", "answer_nll": "nats/token"}
    cands = []
    for i, (cid, status, steps, acc, size, nll, reason, timings) in enumerate(_CANDS):
        vals = {"accuracy": acc, "size": size, "answer_nll": nll} if acc is not None else {}
        cands.append(Candidate(id=cid, episode=i, strategy=Strategy.model_validate({"steps": steps}), status=status,
                               reason=reason, objectives=vals, timings=timings,
                               metrics={k: Measurement(value=v, unit=units[k], n=50 if k != "size" else None)
                                        for k, v in vals.items()},
                               artifact=str(run_dir / "episodes" / cid / "model") if vals else None))
    base, rest = cands[0], cands[1:]
    ok = {c.id: c.objectives for c in rest if c.status == "ok"}
    front = pareto_front(ok, OBJS)
    ref = reference_point(base.objectives, OBJS)
    hv, pts = [], []
    for c in rest:
        if c.status == "ok":
            pts.append(c.objectives)
        hv.append(HVPoint(episode=c.episode, hypervolume=hypervolume(pts, OBJS, ref, normalise=base.objectives)))
    for c in rest:
        if c.status == "ok":
            rr = reward(c.objectives, base.objectives, OBJS, "balanced", 0.9)
            c.reward, c.retention = rr.reward, rr.retention
    cid, rr = recommend(ok, front, base.objectives, OBJS, "balanced", 0.9)
    ff = FrontierFile(
        run=RunMeta(run_id=run_id, model="tiny", model_path=str(run_dir / "base"), dataset="gsm8k", objectives=OBJS,
                    directions={o: DIRECTIONS[o] for o in OBJS}, preset="balanced", min_retention=0.9,
                    sampler="tpe", seed=0, limit=50, proxy_limit=10, episodes=5, device="cpu", acf_version="0.1.0",
                    git_commit=None, runtime="test", created_at=now(), updated_at=now()),
        spec={}, baseline=base, candidates=rest, frontier=front, hypervolume=hv, reference_point=ref,
        recommended=Recommendation(id=cid, reward=rr.reward, terms=rr.terms, preset="balanced",
                                   why="highest reward among feasible frontier members"))
    save_frontier_file(ff, run_dir / "frontier.json")
    return ff


# ------------------------------------------------------------------------------------------- report


def test_load_frontier_and_report(tmp_path):
    from acf.report import load_frontier, write_report

    ff = make_frontier(tmp_path)
    df = load_frontier(tmp_path)
    assert list(df["id"]) == ["baseline", "e1", "e2", "e3", "e4", "e5"]
    assert set(ff.frontier) == {"e1", "e3"}                       # e2 is dominated by e1
    assert df.loc["e1", "step1.method"] == "rtn" and df.loc["e1", "step1.bits"] == 4
    assert df.loc["e1", "compression_ratio"] == pytest.approx(2.5)
    assert df.loc["e3", "retention"] == pytest.approx(0.31 / 0.30)
    assert bool(df.loc["e3", "on_frontier"]) and not bool(df.loc["e2", "on_frontier"])
    assert df.loc["e4", "status"] == "failed" and df.loc["e1", "time.compress"] == 3.0

    md = write_report(tmp_path).read_text()
    assert "## Frontier" in md and "2.5" in md                     # compression ratio of e1 (100 MB / 40 MB)
    assert f"**`{ff.recommended.id}`**" in md
    assert "needs CUDA" in md and "cannot reach the frontier" in md
    # time per stage: compress = 3 + 5 + 20 + 0.5 + 1 = 29.5; evaluate = 10 + 8 + 9 + 8 = 35
    assert "| compress | 29.50 | 5 |" in md and "| evaluate | 35.00 | 4 |" in md
    for x, y in [("accuracy", "size"), ("accuracy", "answer_nll"), ("size", "answer_nll")]:
        p = tmp_path / "report_plots" / f"frontier_{x}_vs_{y}.png"
        assert p.stat().st_size > 1000 and p.name in md
    assert (tmp_path / "report_plots" / "hypervolume.png").is_file()
    assert f"{ff.hypervolume[-1].hypervolume:.6f}" in md


def test_report_refuses_other_schema(tmp_path):
    from acf.report import load_frontier

    make_frontier(tmp_path)
    raw = json.loads((tmp_path / "frontier.json").read_text())
    raw["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "frontier.json").write_text(json.dumps(raw))
    with pytest.raises(AcfError, match="schema_version"):
        load_frontier(tmp_path)


def test_notebook_executes(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    make_frontier(tmp_path)
    nb = nbformat.read(ROOT / "examples" / "inspect_frontier.ipynb", as_version=4)
    os.environ["ACF_RUN_DIR"] = str(tmp_path)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("ACF_RUN_DIR", None)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "e3" in text and "compression_ratio" in text


# ------------------------------------------------------------------------------------------- registry


def _variant(src: Path, out: Path, change_layers: tuple[int, ...] = (), zero_out: tuple[int, ...] = ()) -> Path:
    """Copy a tiny model, perturbing some decoder blocks or zeroing their output projections (near-identity)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():
        for i in change_layers:
            m.model.layers[i].mlp.up_proj.weight.mul_(1.5)
        for i in zero_out:
            m.model.layers[i].self_attn.o_proj.weight.zero_()
            m.model.layers[i].mlp.down_proj.weight.zero_()
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    return out


@pytest.fixture()
def run_with_artifacts(tmp_path, smol_dir):
    from conftest import make_tiny_model

    run = tmp_path / "run"
    base = make_tiny_model(run / "base", smol_dir, layers=3)
    make_frontier(run)
    _variant(base, run / "episodes" / "e1" / "model", change_layers=(1,))
    _variant(base, run / "episodes" / "e2" / "model", change_layers=(0, 2))
    _variant(base, run / "episodes" / "e3" / "model", change_layers=(2,))
    return run


def test_registry_roundtrip_promote_rollback(run_with_artifacts, tmp_path):
    from typer.testing import CliRunner

    from acf.registry import PromotionRefused, RegistryError, open_registry
    from acf.registry_cli import registry_app

    reg_path = tmp_path / "home" / "registry.json"
    cli = CliRunner()
    r = cli.invoke(registry_app, ["--registry", str(reg_path), "list"])
    assert r.exit_code == 2 and "no registry file" in r.output and not reg_path.exists()

    run = run_with_artifacts
    for cid in ("e1", "e2", "e3"):
        r = cli.invoke(registry_app, ["--registry", str(reg_path), "add", str(run), cid])
        assert r.exit_code == 0, r.output
    with open_registry(reg_path, write=False) as reg:
        ids = {e.source.get("candidate_id"): e for e in reg.entries}
        assert [e.kind for e in reg.entries].count("base") == 1          # base registered once, as parent
        base = next(e for e in reg.entries if e.kind == "base")
        e1, e2, e3 = ids["e1"].id, ids["e2"].id, ids["e3"].id
        assert ids["e1"].parent == base.id and ids["e1"].metrics["accuracy"].value == 0.28
        assert [e.id for e in reg.list(method="rtn")] == [e1] and [e.id for e in reg.list(bits=8)] == [e3]
        cmp = reg.compare(base.id, e1)
        assert cmp["shared_layers_by_index"] == [0, 2] and cmp["layers_a"] == 3
        assert cmp["metric_deltas"]["accuracy"]["delta"] == pytest.approx(-0.02)
        assert "embed_tokens.weight" in cmp["shared_other_tensors"]

    R = ["--registry", str(reg_path)]
    assert cli.invoke(registry_app, R + ["promote", e1, "--metric", "accuracy"]).exit_code == 0   # first active
    r = cli.invoke(registry_app, R + ["promote", e2, "--metric", "accuracy", "--margin", "0.01"])
    assert r.exit_code == 2 and "promotion refused" in r.output                                # worse model
    r = cli.invoke(registry_app, R + ["promote", e3, "--metric", "accuracy", "--margin", "0.05"])
    assert r.exit_code == 2 and "margin" in r.output                                         # +0.03 < 0.05
    with open_registry(reg_path) as reg:
        with pytest.raises(PromotionRefused, match="guard size regresses"):
            reg.promote(e3, "accuracy", 0.01, ("size",))                                     # 60 MB vs 40 MB
    r = cli.invoke(registry_app, R + ["promote", e3, "--metric", "accuracy", "--margin", "0.01", "--guard", "answer_nll"])
    assert r.exit_code == 0, r.output
    with open_registry(reg_path, write=False) as reg:
        assert reg.active().id == e3 and not reg.get(e1).active
    r = cli.invoke(registry_app, R + ["rollback"])
    assert r.exit_code == 0, r.output
    with open_registry(reg_path, write=False) as reg:
        assert reg.active().id == e1 and reg.get(e3).rolled_back
    r = cli.invoke(registry_app, R + ["rollback"])
    assert r.exit_code == 2 and "nothing to roll back to" in r.output
    r = cli.invoke(registry_app, R + ["prune", "--keep", "1"])
    assert r.exit_code == 0, r.output
    with open_registry(reg_path, write=False) as reg:
        assert {e.id for e in reg.entries} == {base.id, e1, e3}                             # e2 oldest non-active
    log = [json.loads(l) for l in (reg_path.parent / "registry.log.jsonl").read_text().splitlines()]
    assert [l["op"] for l in log].count("add") == 4 and {"promote", "rollback", "prune"} <= {l["op"] for l in log}

    before = reg_path.read_text()[:-10] + "garbage"
    reg_path.write_text(before)
    r = cli.invoke(registry_app, R + ["promote", e1, "--metric", "accuracy", "--force", "--reason", "x"])
    assert r.exit_code == 2 and "corrupt registry" in r.output and str(reg_path) in r.output
    assert reg_path.read_text() == before
    with pytest.raises(RegistryError, match="corrupt"):
        with open_registry(reg_path, create=True):
            pass
