"""Lifecycle: report + notebook over a frontier file, registry, adapter loop, student extraction.

Frontier files here are made by the test (the report must render any valid file); models are real (tiny
random-init Llamas with the default model's tokenizer) and every number checked is measured from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from acf.core.errors import AcfError
from acf.core.objectives import DIRECTIONS
from acf.search.pareto import hypervolume, pareto_front, reference_point
from acf.core.provenance import Measurement
from acf.search.reward import recommend, retention, reward
from acf.coordinator.state import (SCHEMA_VERSION, Candidate, FrontierFile, HVPoint, Recommendation, RunMeta, now,
                                   save_frontier_file)
from acf.methods.strategy import Strategy

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
    from acf.reports.frontier_frame import load_frontier
    from acf.reports.report import write_report

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
    from acf.reports.frontier_frame import load_frontier

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

    from acf.lifecycle.registry import PromotionRefused, RegistryError, open_registry
    from acf.cli.registry_cmd import registry_app

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


# ------------------------------------------------------------------------------------------- adapter loop


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_collect_filters_dedups_grows_and_refuses_secrets(tmp_path):
    from typer.testing import CliRunner

    from acf.lifecycle import collect, stats_path
    from acf.cli.lifecycle_cmd import distill_app

    runs = _jsonl(tmp_path / "runs.jsonl", [
        {"id": 1, "prompt": "2+2?", "answer": "4", "score": 0.9, "approved": True},
        {"id": 2, "prompt": "3+3?", "answer": "6", "score": 0.5, "approved": True},        # low score
        {"id": 3, "prompt": "4+4?", "answer": "8", "score": 0.95, "approved": False},      # not approved
        {"id": 4, "prompt": "2+2?", "answer": " 4 ", "score": 0.8, "approved": "yes"},     # duplicate of 1
        {"id": 5, "prompt": "my key is sk-abcdefghijklmnopqrstuvwx", "answer": "ok", "score": 1, "approved": True},
        {"id": 6, "prompt": "call it", "answer": "Authorization: Bearer abcdefghijklmnop1234", "score": 1,
         "approved": True},
        {"id": 7, "prompt": "config", "answer": "api_key=0123456789abcdef0123456789abcdef", "score": 1,
         "approved": True},
    ])
    out = tmp_path / "data" / "distill_dataset.jsonl"
    st = collect(runs, out)
    assert (st.kept, st.below_min_score, st.not_approved, st.duplicates_in_batch, st.secrets_refused) == (1, 1, 1, 1, 3)
    assert "sk-abc" not in stats_path(out).read_text()              # stats name the pattern, never the secret
    # an eval file can approve row 3; row 1 is already present; a new row grows the dataset
    ev = tmp_path / "eval.csv"
    ev.write_text("id,score,approved\n3,0.95,true\n")
    runs2 = _jsonl(tmp_path / "runs2.jsonl", [
        {"id": 1, "prompt": "2+2?", "answer": "4", "score": 0.9, "approved": True},
        {"id": 3, "prompt": "4+4?", "answer": "8", "score": 0.95, "approved": False},
        {"id": 8, "prompt": "5+5?", "answer": "10", "score": 0.75, "approved": "true"}])
    st2 = collect(runs2, out, eval_file=ev)
    assert (st2.kept, st2.already_in_dataset, st2.dataset_rows_before, st2.dataset_rows_after) == (2, 1, 1, 3)
    assert [json.loads(l)["answer"] for l in out.read_text().splitlines()] == ["4", "8", "10"]
    assert len(json.loads(stats_path(out).read_text())["collections"]) == 2
    # nothing passes -> clear message, no file (and an existing dataset untouched)
    r = CliRunner().invoke(distill_app, ["collect", "--runs", str(runs2), "--out", str(tmp_path / "new.jsonl"),
                                         "--min-score", "0.99"])
    assert r.exit_code == 2 and "no rows passed" in r.output and not (tmp_path / "new.jsonl").exists()
    before = out.read_text()
    with pytest.raises(AcfError, match="no rows passed"):
        collect(runs2, out)
    assert out.read_text() == before
    st3 = collect(runs, tmp_path / "with_secrets.jsonl", allow_secrets=True)
    assert st3.kept == 4 and st3.secrets_refused == 0


@pytest.fixture(scope="module")
def learnable_tiny(tmp_path_factory, smol_dir):
    """A tiny random-init Llama whose embeddings are scaled up, so a few LoRA steps can make outputs confident
    (at the default init scale the tied head cannot leave the near-uniform distribution)."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_model

    p = make_tiny_model(tmp_path_factory.mktemp("learnable") / "model", smol_dir, layers=2)
    m = AutoModelForCausalLM.from_pretrained(str(p))
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(25)
    m.save_pretrained(p)
    return p


def test_train_eval_promote_rollback(tmp_path, learnable_tiny):
    import shutil

    from typer.testing import CliRunner

    from acf.cli.lifecycle_cmd import distill_app
    from acf.lifecycle.registry import open_registry

    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "car", "boat", "fish", "bird"]
    ds = _jsonl(tmp_path / "ds.jsonl", [{"prompt": f"What is the code for {w}?", "answer": "42"} for w in words])
    guard = tmp_path / "guard.csv"
    guard.write_text("prompt,expected,category\nSay the code.,42,format\nWhat is the code for the sky?,42,safety\n")
    reg = tmp_path / "registry.json"
    R = ["--registry", str(reg)]

    def cfg(name: str, **kw) -> Path:
        c = {"base_model": str(learnable_tiny), "adapter_type": "lora", "train_steps": 15, "lr": 2e-2, "batch_size": 4,
             "eval_steps": 5, "output_dir": str(tmp_path / "adapters"), "dataset": str(ds), "seq_len": 64, **kw}
        return _write(tmp_path / name, c)

    cli = CliRunner()
    r = cli.invoke(distill_app, ["train", "--config", str(cfg("bad.json", epochs=3))] + R)
    assert r.exit_code == 2 and "unknown key 'epochs'" in r.output
    r = cli.invoke(distill_app, ["train", "--config", str(cfg("bad2.json", train_steps=0))] + R)
    assert r.exit_code == 2 and "train_steps" in r.output and not reg.exists()

    r = cli.invoke(distill_app, ["train", "--config", str(cfg("good.json"))] + R)
    assert r.exit_code == 0, r.output
    a1 = Path(r.output.split("adapter: ")[-1].split()[0])
    m = json.loads((a1 / "metrics.json").read_text())
    assert m["steps_done"] == 15 and m["heldout_loss_after"] < m["heldout_loss_before"]
    assert (a1 / "adapter_model.safetensors").is_file() and (a1 / "loss_curve.png").stat().st_size > 1000
    assert a1.parent == tmp_path / "adapters" and a1.name[:8].isdigit()

    # answers are 2 tokens long ("4", "2"): generate 2 so the comparison is about the answer, not the stop
    r = cli.invoke(distill_app, ["eval", "--adapter", str(a1), "--eval-csv", str(guard), "--max-new-tokens", "2"] + R)
    assert r.exit_code == 0, r.output
    ev = json.loads((a1 / "eval.json").read_text())
    g = {x["group"]: x for x in ev["groups"]}
    assert g["heldout"]["base"] == 0.0 and g["heldout"]["adapted"] == 1.0
    assert set(g) == {"heldout", "guard:format", "guard:safety"}
    r = cli.invoke(distill_app, ["promote", "--adapter", str(a1)] + R)
    assert r.exit_code == 0, r.output

    # a barely trained adapter does not beat the base: refused
    r = cli.invoke(distill_app, ["train", "--config", str(cfg("weak.json", train_steps=1, lr=1e-7))] + R)
    a2 = Path(r.output.split("adapter: ")[-1].split()[0])
    assert cli.invoke(distill_app, ["eval", "--adapter", str(a2), "--max-new-tokens", "2"] + R).exit_code == 0
    r = cli.invoke(distill_app, ["promote", "--adapter", str(a2)] + R)
    assert r.exit_code == 2 and "promotion refused" in r.output and "< +0.050" in r.output
    r = cli.invoke(distill_app, ["promote", "--adapter", str(a2), "--force", "--reason", "test"] + R)
    assert r.exit_code == 0, r.output
    # two more adapters (copies: registry bookkeeping only), then roll back to a1: only the last 3 remain
    for k in (3, 4):
        shutil.copytree(a2, tmp_path / "adapters" / f"copy{k}")
        with open_registry(reg) as rg:
            rg.add_entry(kind="adapter", path=tmp_path / "adapters" / f"copy{k}",
                         parent=rg.find_path(learnable_tiny).id)
    with open_registry(reg, write=False) as rg:
        id1 = rg.find_path(a1).id
    r = cli.invoke(distill_app, ["rollback", id1] + R)
    assert r.exit_code == 0, r.output
    with open_registry(reg, write=False) as rg:
        assert rg.active("adapter").path == str(a1)
        assert sorted(Path(e.path).name for e in rg.list(kind="adapter")) == sorted([a1.name, "copy3", "copy4"])
    assert not a2.exists() and a1.exists()


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------------------------------- student extraction


def test_extract_by_importance_differs_from_first_n(tmp_path, smol_dir, data_root):
    from typer.testing import CliRunner

    from acf.cli.extract_cmd import extract_cmd
    from acf.lifecycle.extract import extract
    from acf.lifecycle.registry import open_registry
    from conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "src", smol_dir, layers=4)
    parent = _variant(base, tmp_path / "parent", zero_out=(0, 1))     # blocks 0 and 1 add nothing: identity
    reg = tmp_path / "registry.json"
    imp = extract(str(parent), tmp_path / "imp", by="importance", layers=2, calib_samples=4, seq_len=32,
                  registry_path=reg)
    assert imp.kept_layers == [2, 3] and imp.dropped_layers == [0, 1]
    import typer

    app = typer.Typer()
    app.command()(extract_cmd)
    r = CliRunner().invoke(app, ["--model", str(parent), "--by", "layers", "--ratio", "0.5", "--out",
                                 str(tmp_path / "first"), "--registry", str(reg)])
    assert r.exit_code == 0, r.output
    with open_registry(reg, write=False) as rg:
        first = rg.find_path(tmp_path / "first")
        assert first.kind == "student" and first.parent == imp.parent_id
        c_imp, c_first = rg.compare(imp.parent_id, imp.registry_id), rg.compare(imp.parent_id, first.id)
    assert c_imp["shared_layers_by_hash"] == {0: 2, 1: 3}            # the student's blocks are the parent's 2, 3
    assert c_first["shared_layers_by_hash"] == {0: 0, 1: 1}
    assert c_imp["layers_b"] == 2 and c_imp["compression_ratio"] > 1
    r = CliRunner().invoke(app, ["--model", str(parent), "--layers", "4", "--out", str(tmp_path / "x"),
                                 "--registry", str(reg)])
    assert r.exit_code == 2 and "fewer than 4" in r.output
    rec = extract(str(parent), tmp_path / "rec", by="importance", ratio=0.5, recover="distill", steps=2,
                  calib_samples=4, seq_len=32, register=False,
                  recover_params={"samples": 8, "seq_len": 32, "batch_size": 2})
    assert [s["method"] for s in rec.steps] == ["drop_layers", "distill"] and rec.kept_layers == [2, 3]
