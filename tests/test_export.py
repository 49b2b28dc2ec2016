"""`acf export` (a run's candidate as a folder with a model card, an Ollama Modelfile for a GGUF, export.json) and
`acf merge` (a LoRA adapter merged into its base), on real tiny models: an RTN compressed-tensors folder and a
Q8_0 GGUF made by acf's own methods, referenced by a frontier.json built by hand (so every figure is known)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from acf.coordinator.state import Candidate, FrontierFile, Recommendation, RunMeta, save_frontier_file
from acf.core.provenance import Measurement
from acf.core.stats import per_item
from acf.methods.strategy import Step, Strategy

TRANSFORMERS = "python 3.11.7, torch 2.13.0+cpu, transformers 5.17.0"
LLAMA = "llama.cpp CPU (llama-cpp-python 0.3.36, 2 threads)"
DEV = "cpu (x86_64, 2 cores, 2 threads)"
ITEMS = [f"gsm8k-{i}" for i in range(6)]


def _m(value, unit="nats/token", n=6, ci=None, runtime=TRANSFORMERS, method="test measure", sums=None):
    extra = {"per_item": per_item(ITEMS, sums, [10] * len(sums))} if sums else {}
    return Measurement(value=value, unit=unit, n=n, ci95=ci, device=DEV, runtime=runtime, method=method, extra=extra)


def _figures(kld, size, latency, runtime=TRANSFORMERS, sums=None) -> dict[str, Measurement]:
    return {"kld": _m(kld, ci=(kld * 0.9, kld * 1.1), runtime=runtime, sums=sums),
            "top1": _m(0.8765432, unit="fraction", ci=(0.85, 0.9), runtime=runtime),
            "kld_general": _m(kld * 3.21, n=72, ci=(kld * 3, kld * 3.4), runtime=runtime),
            "size": Measurement(value=float(size), unit="bytes", device="disk", method="bytes of the model's files"),
            "latency": _m(latency, unit="ms/token", n=3, runtime=runtime, method="batch-1 decode, median of 3")}


def _cand(cid: str, steps: list[dict], metrics, artifact=None, by="optuna:tpe", final=None) -> Candidate:
    return Candidate(id=cid, episode=int(cid[1:]) if cid[1:].isdigit() else 0,
                     strategy=Strategy(steps=[Step(**s) for s in steps]), proposed_by=by, metrics=metrics,
                     final_metrics=final or {}, artifact=None if artifact is None else str(artifact),
                     artifact_kept=artifact is not None)


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def made(tiny_model_dir, data_root, tmp_path_factory) -> dict[str, Path]:
    """Two real models of the tiny Llama: RTN W4 g32 (compressed-tensors) and Q8_0 (GGUF, no imatrix)."""
    from acf.methods import StepContext, run_strategy
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec
    from acf.tasks import get_task

    root = tmp_path_factory.mktemp("export-src")
    ctx = StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)
    out = {}
    for name, step in (("rtn", {"method": "rtn", "params": {"bits": 4, "group_size": 32}}),
                       ("gguf", {"method": "gguf", "params": {"type": "Q8_0", "imatrix": False}})):
        strat = validate_strategy({"steps": [step]}, infer_spec(tiny_model_dir))
        recs = run_strategy(strat, tiny_model_dir, root / name, ctx)
        assert recs[-1].status == "ok", recs[-1].reason
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def run_dir(made, tiny_model_dir, tmp_path_factory) -> Path:
    """A run whose recommended pick c001 is the RTN folder, c002 was not kept, c003 is the GGUF; one fixed recipe
    no larger than c001 (the card's comparison), measured on the same items (a paired ratio)."""
    rd = tmp_path_factory.mktemp("export-run") / "run"
    meta = RunMeta(run_id="tiny-run", model=str(tiny_model_dir), model_path=str(tiny_model_dir), dataset="gsm8k",
                   objectives=["kld", "size"], directions={"kld": "minimize", "size": "minimize"}, preset="balanced",
                   min_retention=None, sampler="tpe", seed=0, limit=6, proxy_limit=None, episodes=3, device="cpu",
                   device_name=DEV, acf_version="0.1.0", git_commit="abc123", runtime=TRANSFORMERS, created_at="",
                   updated_at="", item_sets={"search": {"offset": 0, "count": 6}, "report": {"offset": 6, "count": 12}})
    rtn = [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}]
    s_rtn = _size(made["rtn"])
    c1 = _cand("c001", rtn, _figures(0.0123456789, s_rtn, 31.4159, sums=[1.0, 2.0, 1.5, 1.2, 0.8, 1.1]),
               made["rtn"], final=_figures(0.0134567891, s_rtn, 30.5))
    c2 = _cand("c002", [{"method": "rtn", "params": {"bits": 8}}], _figures(0.002, s_rtn * 2, 28.0))
    c3 = _cand("c003", [{"method": "gguf", "params": {"type": "Q8_0", "imatrix": False}}],
               _figures(0.00456, (made["gguf"] / "model.gguf").stat().st_size, 7.25, runtime=LLAMA), made["gguf"])
    recipe = _cand("r:rtn_w4g64", [{"method": "rtn", "params": {"bits": 4, "group_size": 64}}],
                   _figures(0.0456789, s_rtn - 1000, 30.0, sums=[2.0, 4.0, 3.0, 2.5, 1.5, 2.0]), by="fixed recipe")
    base = _cand("c000", [], {"size": Measurement(value=float(_size(tiny_model_dir)), unit="bytes", device="disk")},
                 tiny_model_dir, by="baseline")
    ff = FrontierFile(run=meta, spec={}, baseline=base, candidates=[c1, c2, c3], recipes=[recipe],
                      frontier=["c001", "c003"],
                      recommended=Recommendation(id="c001", reward=0.5, terms={}, preset="balanced", why="test pick"))
    save_frontier_file(ff, rd / "frontier.json")
    return rd


from cli_run import run_cli as _acf  # noqa: E402  (exit code, stdout, stderr)


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return " ".join(ln.strip() for ln in lines)


def _rows(card: str, heading: str) -> dict[str, list[str]]:
    """The figure table under `heading`: metric -> its cells."""
    part = card.split(heading, 1)[1].split("\n#", 1)[0]
    out = {}
    for line in part.splitlines():
        if line.startswith("| ") and not line.startswith("| metric"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0]] = cells
    return out


def _logits(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return m(torch.tensor([[1, 5, 9, 20, 33, 7]])).logits


def test_export_recommended_loads_and_card_states_the_run_figures(run_dir, made, tmp_path, capsys):
    from acf.coordinator.state import load_frontier_file

    out = tmp_path / "smol-export"
    code, _, err = _acf(capsys, "export", run_dir, "--out", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]   # the temporary sibling was renamed
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777, (out / "README.md").stat().st_mode & 0o777) == (0o777 & ~mask, 0o666 & ~mask)
    import torch

    assert torch.equal(_logits(out), _logits(made["rtn"]))   # plain from_pretrained loads the very model measured

    ff = load_frontier_file(run_dir)
    c = ff.candidate("c001")
    card = (out / "README.md").read_text()
    for heading, ms in (("### Search items", c.metrics), ("### Held-out items", c.final_metrics)):
        rows = _rows(card, heading)
        for k in ("kld", "top1", "kld_general", "latency"):
            m = ms[k]
            assert float(rows[k][1]) == pytest.approx(m.value, rel=1e-5), (heading, k)
            assert rows[k][3] == str(m.n) and rows[k][5] == m.device
            assert rows[k][6] == f"transformers ({TRANSFORMERS})"                  # every figure names its runtime
            if m.ci95:
                lo, hi = (float(x) for x in rows[k][4].strip("[]").split(","))
                assert (lo, hi) == (pytest.approx(m.ci95[0], rel=1e-5), pytest.approx(m.ci95[1], rel=1e-5))
        assert f"({int(ms['size'].value):,} bytes)" in rows["size"][1]
    assert "measured in transformers' dequantized path" in card and "not a deployment figure" in card
    assert "`r:rtn_w4g64`" in card and "0.0456789" in card                          # the best recipe at no larger size
    assert "(paired bootstrap over items)" in card
    assert "abc123" in card and "tiny-run" in card                                  # the run's acf commit
    assert "vllm serve ./smol-export" in card and 'from_pretrained("./smol-export")' in card
    if importlib.util.find_spec("vllm") is None:
        assert "Loadability in vLLM not checked by acf (vLLM not installed here)" in card
    assert "fused groups mix formats" not in card                                    # uniform RTN: no allocation
    rec = json.loads((out / "export.json").read_text())
    assert rec["candidate"] == c.model_dump(mode="json") and rec["source_run"] == str(run_dir.resolve())
    assert rec["format"] == "compressed-tensors" and "README.md" in rec["files"]


def test_unknown_or_unkept_candidate_is_one_line_exit_2(run_dir, tmp_path, capsys):
    for cid, want in (("c999", "no candidate 'c999'"), ("c002", "has no kept model"),
                      ("c000", "is the uncompressed baseline")):
        code, _, err = _acf(capsys, "export", run_dir, cid, "--out", tmp_path / cid)
        assert code == 2, err
        line = _one_line(err)
        assert want in line and "c001, c003" in line, line
        assert not (tmp_path / cid).exists()


def test_a_non_empty_folder_is_replaced_only_with_force(run_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = _acf(capsys, "export", run_dir, "c001", "--out", out)
    assert code == 2 and "--force" in _one_line(err) and (out / "mine.txt").is_file()
    code, _, err = _acf(capsys, "export", run_dir, "c001", "--out", out, "--force")
    assert code == 0, err
    assert not (out / "mine.txt").exists() and (out / "README.md").is_file()
    code, _, err = _acf(capsys, "export", run_dir, "c001", "--out", run_dir.parent, "--force")
    assert code == 2 and "overlaps" in _one_line(err) and (run_dir / "frontier.json").is_file()


def test_gguf_export_has_the_measured_file_and_a_modelfile_naming_it(run_dir, made, tmp_path, capsys):
    from acf.core.atomic import sha256_file
    from acf.models.gguf_file import read_gguf

    out = tmp_path / "gguf-export"
    code, _, err = _acf(capsys, "export", run_dir, "c003", "--out", out)
    assert code == 0, err
    ggufs = list(out.glob("*.gguf"))
    assert len(ggufs) == 1 and sha256_file(ggufs[0]) == sha256_file(made["gguf"] / "model.gguf")
    assert read_gguf(ggufs[0]).architecture == "llama"
    mf = (out / "Modelfile").read_text()
    assert f"FROM ./{ggufs[0].name}\n" in mf
    assert "<|im_start|>" in mf and 'PARAMETER stop "<|im_end|>"' in mf   # the tiny model has SmolLM2's ChatML
    card = (out / "README.md").read_text()
    assert f"llama-server -m ./gguf-export/{ggufs[0].name}" in card and "ollama create" in card
    assert "measured in llama.cpp, the runtime this file deploys in" in card and "llama.cpp type Q8_0" in card
    assert float(_rows(card, "### Search items")["kld"][1]) == pytest.approx(0.00456)
    assert _rows(card, "### Search items")["latency"][6] == LLAMA
    assert not list(out.glob("*.safetensors")) and json.loads((out / "export.json").read_text())["format"] == "gguf"


def test_card_says_which_fused_groups_an_allocation_mixes(run_dir):
    """A per-layer allocation that gives q/k/v (or gate/up) of one block different formats is what vLLM refuses
    (#30): the card names it rather than claim the model serves there."""
    from acf.coordinator.state import load_frontier_file
    from acf.lifecycle.export_card import card_text, fused_mixes

    lf = {f"model.layers.{b}.{p}": "w4g32" for b in range(2) for p in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")}
    assert fused_mixes(lf) == ([], 4)
    lf["model.layers.1.self_attn.k_proj"] = "w8"
    mixed, n = fused_mixes(lf)
    assert n == 4 and mixed == ["model.layers.1.self_attn: k_proj=w8, q_proj=w4g32, v_proj=w4g32"]
    ff = load_frontier_file(run_dir)
    c = ff.candidate("c001").model_copy(deep=True)
    c.strategy.steps[0].params = {"layer_formats": lf}
    ff.candidates[0] = c
    card = card_text(ff, "c001", fmt="compressed-tensors", folder="x")
    assert "In this allocation 1 of 4 fused groups mix formats" in card and "not tried" in card
    assert "14 layers: w4g32 x13, w8 x1" in card


def test_merge_gives_a_plain_folder_with_peft_merged_logits(tiny_model_dir, tmp_path, capsys):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False))   # random B: the merge changes the model
    adapter = tmp_path / "adapter"
    pm.save_pretrained(str(adapter))
    out = tmp_path / "merged"
    code, _, err = _acf(capsys, "merge", adapter, "--base", tiny_model_dir, "--out", out)
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                    str(adapter)).merge_and_unload()
    with torch.no_grad():
        want = ref(torch.tensor([[1, 5, 9, 20, 33, 7]])).logits
    got = _logits(out)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, _logits(tiny_model_dir), atol=1e-4)
    code, _, err = _acf(capsys, "merge", tiny_model_dir, "--base", tiny_model_dir, "--out", tmp_path / "m2")
    assert code == 2 and "not a peft adapter folder" in _one_line(err) and not (tmp_path / "m2").exists()
