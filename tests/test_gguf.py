"""GGUF export (llama.cpp's converter + quantizer), the llama.cpp runtime, and `--model file.gguf`, on tiny random-init
models (hidden 64: Q8_0/Q4_0/IQ4_NL blocks of 32 fit, k-quant blocks of 256 do not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_tiny_model

HIDDEN = 64


def _qwen3(out: Path, tok_dir: Path) -> Path:
    """Qwen3 (q/k norms, untied output). Not Qwen2: transformers 5 reads the default model's tokenizer under a
    qwen2 config as Qwen2Tokenizer, whose pre-tokenization llama.cpp's converter does not recognise."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(1)
    cfg = Qwen3Config(head_dim=16, vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smol_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-archs")
    return {"llama": make_tiny_model(root / "llama", smol_dir, hidden=HIDDEN), "qwen3": _qwen3(root / "qwen3", smol_dir)}


@pytest.fixture(scope="module")
def gsm8k(data_root):
    from acf.tasks import get_task

    return get_task("gsm8k", str(data_root / "gsm8k"))


def _export(model_dir: Path, out: Path, task, **params) -> Path:
    from acf.methods import StepContext, run_strategy
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    p = {"calib_samples": 4, "seq_len": 64, **params}
    strat = validate_strategy({"steps": [{"method": "gguf", "params": p}]}, infer_spec(model_dir))
    recs = run_strategy(strat, model_dir, out, StepContext(task=task))
    assert recs[-1].status == "ok", recs[-1].reason
    return out


@pytest.fixture(scope="module")
def exports(tiny_dirs, gsm8k, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-out")
    return {
        "llama-q8": _export(tiny_dirs["llama"], root / "llama-q8", gsm8k, type="Q8_0", imatrix=True),
        "qwen3-q4": _export(tiny_dirs["qwen3"], root / "qwen3-q4", gsm8k, type="Q4_0", imatrix=False,
                            overrides={"output\\.weight": "Q5_0"}),
    }


@pytest.mark.parametrize("key,arch,main", [("llama-q8", "llama", "Q8_0"), ("qwen3-q4", "qwen3", "Q4_0")])
def test_export_quantize_reload(key, arch, main, exports):
    from acf.evaluation.llamacpp import open_llama
    from acf.models.gguf_file import GGUF_NAME, is_gguf_dir, load_manifest, read_gguf

    d = exports[key]
    assert is_gguf_dir(d)
    info = read_gguf(d / GGUF_NAME)
    man = load_manifest(d)
    assert info.architecture == arch and man.type == main
    assert info.tokenizer_model == "gpt2" and info.tokenizer_pre == "smollm"   # llama.cpp tokenizes text right
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(d / GGUF_NAME)).tensors}
    projections = [n for n in types if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert len(projections) == 2 * 7
    # the file type's own tensor type for most projections (llama.cpp's mixes may raise a few, e.g. attn_v)
    assert sum(types[n] == main for n in projections) >= 10, types
    if key == "llama-q8":
        assert man.imatrix and man.imatrix["tensors"] == 15 and not man.imatrix["unmapped_linears"]
    else:
        assert man.imatrix is None
        assert types["output.weight"] == "Q5_0"              # the per-tensor override (default: Q8_0 here)
    llm = open_llama(d / GGUF_NAME, 256, logits_all=False)   # llama.cpp loads and runs it
    try:
        llm.eval([1, 2, 3])
    finally:
        llm.close()


def test_q8_top1_agreement_with_hf(tiny_dirs, exports, gsm8k):
    """llama.cpp's logits of the Q8_0 export pick the HF model's top-1 token at >= 99% of test-text positions."""
    import torch

    from acf.evaluation.fidelity import build_reference, teacher_forced
    from acf.evaluation.llamacpp import LlamaCppLM
    from acf.evaluation.sequences import task_sequences
    from acf.models.gguf_file import GGUF_NAME
    from acf.models.loading import load_model

    model, tok = load_model(tiny_dirs["llama"])
    seqs = task_sequences(gsm8k, tok, gsm8k.load("test", limit=8, seed=0))
    ref = build_reference(model, tok, seqs, batch_size=4)
    lm = LlamaCppLM(exports["llama-q8"] / GGUF_NAME, 1024)
    try:
        m = teacher_forced(lm, tok, seqs, ["top1", "kld"], reference=ref, batch_size=1)
    finally:
        lm.close()
    assert m["top1"].n == 8 and m["top1"].extra["tokens"] > 500
    assert m["top1"].value >= 0.99, m["top1"]
    assert m["kld"].value < 0.01
    del torch


def test_evaluate_gguf_in_llamacpp(exports, gsm8k, tiny_dirs):
    from acf.evaluation.runner import Loaded, build_fidelity, evaluate

    items = gsm8k.load("test", limit=3, seed=0)
    base = Loaded.load(tiny_dirs["llama"], "cpu")
    fid = build_fidelity(base.model, base.tokenizer, gsm8k, items, general=False)
    base.free()
    r = evaluate(exports["llama-q8"], gsm8k, ["kld", "top1", "answer_nll", "latency", "memory", "size"], limit=3,
                 fidelity=fid, latency_tokens=8, max_new_tokens=16, show_progress=False)
    for k in ("kld", "top1", "answer_nll", "latency", "memory", "size"):
        assert r.metrics[k].value is not None, k
    for k in ("latency", "memory", "kld", "answer_nll"):
        assert r.metrics[k].runtime.startswith("llama.cpp CPU"), (k, r.metrics[k].runtime)
    assert r.metrics["size"].value == (exports["llama-q8"] / "model.gguf").stat().st_size


def test_model_gguf_imports_once(exports, tmp_path, monkeypatch):
    import acf.models.loading as M

    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    calls = []
    real = M.import_gguf
    monkeypatch.setattr(M, "import_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    f = exports["llama-q8"] / "model.gguf"
    p1 = M.resolve_model(str(f))
    p2 = M.resolve_model(str(f))
    assert p1 == p2 and len(calls) == 1
    assert (p1 / "config.json").is_file() and json.loads((p1 / "config.json").read_text())["model_type"] == "llama"
    assert not [x for x in p1.parent.iterdir() if x.name.startswith(".")]   # no temporary left behind


from cli_run import run_cli as _acf  # noqa: E402  (exit code, stdout, stderr)


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    joined = " ".join(ln.strip() for ln in lines)
    assert "Traceback" not in err
    return joined


def test_bad_gguf_files_one_line_exit_2(exports, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    src = (exports["llama-q8"] / "model.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[: len(src) // 2])
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    for f, want in ((cut, "truncated"), (text, "not a GGUF file")):
        code, _, err = _acf(capsys, "spec", "--model", str(f))
        assert code == 2, err
        assert want in _one_line(err)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())     # nothing half-imported


@pytest.mark.parametrize("params,want", [
    ({"type": "Q9_K"}, "unknown GGUF type 'Q9_K'"),
    ({"type": "Q4_K_M"}, "valid for this model: F16, BF16, Q8_0, Q5_0, Q4_0, IQ4_NL"),
    ({"type": "Q8_0", "overrides": {"output": "Q7"}}, "unknown tensor type 'Q7'"),
])
def test_bad_types_one_line_exit_2_nothing_written(params, want, tiny_dirs, tmp_path, capsys, data_root):
    out = tmp_path / "out"
    strat = json.dumps({"steps": [{"method": "gguf", "params": params}]})
    code, _, err = _acf(capsys, "compress", "--model", str(tiny_dirs["llama"]), "--out", str(out), "--strategy",
                        strat, "--dataset", "gsm8k", "--data-dir", str(data_root / "gsm8k"))
    assert code == 2, err
    assert want in _one_line(err)
    assert not out.exists()


def test_search_space_offers_gguf_types_the_shapes_allow(tiny_dirs, smol_dir):
    import optuna

    from acf.search.space import SearchSpace
    from acf.models.spec import infer_spec
    from acf.methods.strategy import validate_strategy

    tiny = infer_spec(tiny_dirs["llama"])
    sp = SearchSpace(tiny, quant_methods=["gguf"], prune_methods=["none", "drop_layers"], calib_samples=4, seq_len=64)
    assert sp.gguf_types == ["Q8_0", "Q4_0"]             # 64-wide layers: no 256-blocks
    smol = SearchSpace(infer_spec(smol_dir), quant_methods=["gguf"])
    assert {"Q4_K_M", "IQ4_XS", "Q6_K"} <= set(smol.gguf_types)   # 1536-wide ffn_down takes 256-blocks
    assert any(s.get("gguf_type") == "Q4_K_M" for s in smol.seeds())
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        t = study.ask()
        strat = sp.suggest(t)
        assert strat.steps[-1].method == "gguf"
        validate_strategy(strat, tiny)                     # every proposal passes validation
        study.tell(t, [1.0, 1.0])


@pytest.mark.parametrize("kw,want", [
    ({"runtime": "llamacpp", "quant_methods": ["gptq"]}, "runs GGUF files only"),
    ({"runtime": "tensorrt"}, "--runtime 'tensorrt'"),
])
def test_runtime_config_is_validated(kw, want, tmp_path):
    from acf.core.errors import AcfError
    from acf.coordinator.run_context import RunConfig, validate_config

    with pytest.raises(AcfError, match=want.replace("(", r"\(")):
        validate_config(RunConfig(run_dir=str(tmp_path / "r"), **kw), ("accuracy", "answer_nll"))
    cfg = validate_config(RunConfig(run_dir=str(tmp_path / "r"), runtime="llamacpp"), ("accuracy", "answer_nll"))
    assert cfg.quant_methods == ["gguf"]


def test_distill_promote_exports_gguf_and_rollback_restores_it(tmp_path, tiny_dirs, monkeypatch):
    """`acf distill promote --export gguf:Q8_0` merges the adapter into its base and exports it; the deploy link
    follows promote and rollback."""
    from typer.testing import CliRunner

    from acf.lifecycle.deploy import deploy_link
    from acf.models.gguf_file import read_gguf
    from acf.cli.lifecycle_cmd import distill_app
    from acf.lifecycle.registry import open_registry

    monkeypatch.setenv("ACF_HOME", str(tmp_path / "home"))
    rows = [{"prompt": f"What is the code for {w}?", "answer": "42"} for w in ["red", "blue", "green", "cat", "dog",
                                                                              "sun", "moon", "tree"]]
    ds = tmp_path / "ds.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reg = tmp_path / "registry.json"
    R = ["--registry", str(reg)]
    cli = CliRunner()
    adapters = []
    for i in range(2):
        c = tmp_path / f"c{i}.json"
        c.write_text(json.dumps({"base_model": str(tiny_dirs["llama"]), "adapter_type": "lora", "train_steps": 2,
                                 "lr": 1e-3, "batch_size": 4, "eval_steps": 2, "seq_len": 64, "seed": i,
                                 "output_dir": str(tmp_path / "adapters"), "dataset": str(ds)}))
        r = cli.invoke(distill_app, ["train", "--config", str(c)] + R)
        assert r.exit_code == 0, r.output
        a = Path(r.output.split("adapter: ")[-1].split()[0])
        assert cli.invoke(distill_app, ["eval", "--adapter", str(a), "--max-new-tokens", "2"] + R).exit_code == 0
        r = cli.invoke(distill_app, ["promote", "--adapter", str(a), "--force", "--reason", "test",
                                     "--export", "gguf:Q8_0"] + R)
        assert r.exit_code == 0, r.output
        adapters.append(a)
        link = deploy_link(tiny_dirs["llama"].name)
        assert link.resolve() == (a / "gguf-Q8_0" / "model.gguf").resolve()
        assert read_gguf(link).architecture == "llama"
    r = cli.invoke(distill_app, ["promote", "--adapter", str(adapters[1]), "--export", "gguf:Q7"] + R)
    assert r.exit_code == 2 and "gguf:TYPE" in r.output
    with open_registry(reg, write=False) as rg:
        id0 = rg.find_path(adapters[0]).id
        assert rg.find_path(adapters[1]).source["gguf_export"]["type"] == "Q8_0"
    r = cli.invoke(distill_app, ["rollback", id0] + R)
    assert r.exit_code == 0, r.output
    assert deploy_link(tiny_dirs["llama"].name).resolve() == (adapters[0] / "gguf-Q8_0" / "model.gguf").resolve()


def test_llamacpp_offloads_where_the_build_can_and_says_so(monkeypatch):
    """A CUDA build of llama.cpp puts every layer on the GPU and every Measurement says "llama.cpp CUDA"; this CPU
    build (and ACF_LLAMA_CPU=1 on any build) stays on the CPU."""
    import llama_cpp

    from acf.evaluation import llamacpp as L

    L.gpu_offload.cache_clear()
    assert L.gpu_offload() is False and L.runtime_label() == "llama.cpp CPU"    # the build here has no GPU backend
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    try:
        L.gpu_offload.cache_clear()
        assert L.gpu_offload() and L.runtime_label() == "llama.cpp CUDA"
        assert L.cpu_string().startswith("cuda (") and "offloaded" in L.cpu_string()
        monkeypatch.setenv("ACF_LLAMA_CPU", "1")
        L.gpu_offload.cache_clear()
        assert not L.gpu_offload() and L.runtime_label() == "llama.cpp CPU"
    finally:
        L.gpu_offload.cache_clear()
