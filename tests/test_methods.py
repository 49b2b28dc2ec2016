"""Compression methods on the tiny random Llama (CPU): every test checks a real effect on the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from acf.methods.base import StepContext
from acf.methods.run_steps import run_strategy
from acf.methods.strategy import validate_strategy
from acf.tasks import get_task

CAL = {"calib_samples": 4, "seq_len": 32}
TRAIN = {"batch_size": 2, "seq_len": 64, "samples": 24}


@pytest.fixture(scope="module")
def ctx(data_root, tiny_model_dir) -> StepContext:
    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def tiny4_dir(tmp_path_factory, smol_dir) -> Path:
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", smol_dir, layers=4)


def run(steps: list[dict], src: Path, out: Path, ctx: StepContext):
    recs = run_strategy(validate_strategy({"steps": steps}), src, out, ctx)
    assert recs, "no step ran"
    return recs


def run_ok(steps: list[dict], src: Path, out: Path, ctx: StepContext):
    recs = run(steps, src, out, ctx)
    assert all(r.status == "ok" for r in recs), [r.reason for r in recs]
    assert (out / "config.json").is_file()
    assert not out.with_name(out.name + ".work").exists(), "intermediate step dirs must be removed"
    return recs


def load_plain(path: Path):
    """Reload with transformers; compressed-tensors checkpoints are dequantized so weights can be inspected."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    kw = {}
    if q.get("quant_method") == "compressed-tensors":
        kw["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


def decoder_linears(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n and m.weight.dtype.is_floating_point]


def generates(model) -> torch.Tensor:
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape[1] == 10
    return out


# --- calibration ---------------------------------------------------------------------------------------------------

def test_calibration_from_train_split_deterministic(ctx, tiny_model_dir):
    from acf.methods.calibration import calibration_dataset, calibration_ids
    from acf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    a = calibration_ids(tok, ctx.task, 3, 48, seed=0)
    assert a.shape == (3, 48)
    assert torch.equal(a, calibration_ids(tok, ctx.task, 3, 48, seed=0))
    assert not torch.equal(a, calibration_ids(tok, ctx.task, 3, 48, seed=1))
    from acf.evaluation.sequences import task_sequences

    # packed from the task's train split, in the prompt format evaluation uses (chat template where there is one)
    first = task_sequences(ctx.task, tok, ctx.task.train_pairs(1, seed=0))[0]
    head = list(first.prompt + first.target)[:48]
    assert a[0].tolist()[:len(head)] == head
    ds = calibration_dataset(tok, ctx.task, 2, 16)
    assert set(ds.column_names) == {"input_ids", "attention_mask"} and len(ds[0]["input_ids"]) == 16


# --- quantization --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params,bits,group", [
    ("gptq", {"bits": 4, "group_size": 32, **CAL}, 4, 32),
    ("gptq", {"bits": 3, "group_size": 16, "act_order": True, **CAL}, 3, 16),
    ("rtn", {"bits": 2, "group_size": 16}, 2, 16),
    ("awq", {"bits": 4, "group_size": 32, "calib_samples": 2, "seq_len": 32}, 4, 32),
    ("autoround", {"bits": 4, "group_size": 32, "iters": 2, **CAL}, 4, 32),
    ("w8a8", {**CAL}, 8, None),
])
def test_llmcompressor_quantization_real(method, params, bits, group, tiny_model_dir, tmp_path, ctx):
    out = tmp_path / method
    rec = run_ok([{"method": method, "params": params}], tiny_model_dir, out, ctx)[0]
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] != "dense"
    assert (out / "tokenizer_config.json").is_file()
    # every output says whether vLLM would load it (by its rules): 2- and 3-bit weights, no; 4 and 8 bits, yes
    assert rec.extra["deploy_check"]["conforms"] == (bits in (4, 8)) and "not loaded" in rec.extra["deploy_check"]["checked"]
    if "calib_samples" in params:
        # train splits only: the task's, plus the default share of general text (other tasks' train splits)
        cal = rec.extra["calibration"]
        assert cal["source"].startswith("gsm8k train split") and cal["source"].endswith(" train)")
        assert cal["general_share"] == 0.25 and "gsm8k" not in cal["general_sources"]
    model = load_plain(out)
    lins = decoder_linears(model)
    assert lins
    for name, lin in lins:
        w = lin.weight.detach()
        rows = w.reshape(-1, group) if group else w      # one quantization group (or output channel) per row
        worst = max(int(r.unique().numel()) for r in rows)
        assert worst <= 2 ** bits, f"{name}: {worst} distinct values in a group, more than 2^{bits}"
    generates(model)


@pytest.mark.parametrize("method,cls", [("bnb_int8", "Linear8bitLt"), ("bnb_nf4", "Linear4bit")])
def test_bnb_reloads_with_from_pretrained(method, cls, tiny_model_dir, tmp_path, ctx):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    run_ok([{"method": method}], tiny_model_dir, out, ctx)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"})
    kinds = {type(m).__name__ for m in model.modules()}
    assert cls in kinds
    generates(model)


# --- pruning -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", [
    ("magnitude", {"sparsity": 0.5}),
    ("magnitude", {"sparsity": 0.5, "pattern": "2:4"}),
    ("wanda", {"sparsity": 0.5, **CAL}),
    ("sparsegpt", {"sparsity": 0.5, "pattern": "2:4", **CAL}),
])
def test_weight_pruning_zeros_survive_reload(method, params, tiny_model_dir, tmp_path, ctx):
    out = tmp_path / method
    rec = run_ok([{"method": method, "params": params}], tiny_model_dir, out, ctx)[0]
    model = load_plain(out)
    lins = decoder_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for _, m in lins)
    total = sum(m.weight.numel() for _, m in lins)
    assert abs(zeros / total - params["sparsity"]) < 0.02, zeros / total
    assert abs(rec.extra["measured_sparsity"] - zeros / total) < 0.01
    if params.get("pattern") == "2:4":
        for name, m in lins:
            per_group = (m.weight.reshape(-1, 4) == 0).sum(1)
            assert bool((per_group >= 2).all()), f"{name}: a group of 4 keeps more than 2 weights"
    # the embeddings and lm_head are untouched
    assert float((model.get_input_embeddings().weight == 0).float().mean()) < 0.01


def test_drop_layers_by_importance_smaller_and_generates(tiny4_dir, tmp_path, ctx):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dropped"
    rec = run_ok([{"method": "drop_layers", "params": {"count": 2, "by": "importance", **CAL}}], tiny4_dir, out, ctx)[0]
    ex = rec.extra
    assert len(ex["importance"]) == 4 and len(ex["dropped_layers"]) == 2
    # the dropped blocks are the two least important ones
    assert sorted(ex["dropped_layers"]) == sorted(sorted(range(4), key=lambda i: ex["importance"][i])[:2])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    assert len(cfg.get("layer_types", [None, None])) == 2
    from acf.core.instruments import weight_files_size
    assert weight_files_size(out) < weight_files_size(tiny4_dir)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert len(model.model.layers) == 2
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
    with_cache = generates(model)
    no_cache = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, no_cache), "KV cache broke after renumbering"


@pytest.mark.parametrize("by,params,expect", [("first", {"count": 1}, [0]), ("last", {"count": 2}, [2, 3]),
                                               ("explicit", {"layers": [1, 2]}, [1, 2])])
def test_drop_layers_selection(by, params, expect, tiny4_dir, tmp_path, ctx):
    rec = run_ok([{"method": "drop_layers", "params": {"by": by, **params}}], tiny4_dir, tmp_path / by, ctx)[0]
    assert rec.extra["dropped_layers"] == expect


# --- recovery ------------------------------------------------------------------------------------------------------

def test_distill_shallower_sparse_student_loss_falls(tiny4_dir, tmp_path, ctx):
    from dataclasses import replace

    c = replace(ctx, teacher_dir=tiny4_dir)
    out = tmp_path / "distilled"
    recs = run_ok([{"method": "drop_layers", "params": {"count": 1, "by": "last"}},
                   {"method": "magnitude", "params": {"sparsity": 0.5}},
                   {"method": "distill", "params": {"steps": 12, "lr": 1e-2, **TRAIN}}], tiny4_dir, out, c)
    ex = recs[-1].extra
    assert ex["student_layers"] == 3 and ex["teacher_layers"] == 4
    assert len(ex["loss_curve"]) == 12 and all(isinstance(x, float) for x in ex["loss_curve"])
    assert ex["loss_last5_mean"] < ex["loss_first5_mean"]
    assert ex["sparsity_kept"] and abs(ex["sparsity_after"] - 0.5) < 0.01    # pruned weights stay pruned
    assert recs[0].output_dir is None and recs[0].extra.get("intermediate_removed")


def test_lora_merged_improves_heldout_and_saves_adapter(tiny_model_dir, tmp_path, ctx):
    out = tmp_path / "lora"
    rec = run_ok([{"method": "lora", "params": {"steps": 12, "lr": 2e-2, "rank": 8, **TRAIN}}],
                 tiny_model_dir, out, ctx)[0]
    ex = rec.extra
    assert ex["heldout_loss_merged"] < ex["heldout_loss_before"]
    assert abs(ex["heldout_loss_merged"] - ex["heldout_loss_adapter"]) < 1e-3   # merging loses nothing
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert any((out / "adapter").glob("adapter_model.*"))
    model = load_plain(out)
    assert not any("lora" in n for n, _ in model.named_parameters())         # merged: a plain checkpoint


def test_qlora_on_nf4_base_reloads_4bit(tiny_model_dir, tmp_path, ctx):
    from transformers import AutoModelForCausalLM

    from acf.methods.training_loop import eval_loss
    from acf.methods.calibration import training_examples
    from acf.models.loading import load_tokenizer

    out = tmp_path / "qlora"
    rec = run_ok([{"method": "bnb_nf4"}, {"method": "lora", "params": {"qlora": True, "steps": 10, "lr": 2e-2,
                                                                       **TRAIN}}], tiny_model_dir, out, ctx)[-1]
    ex = rec.extra
    assert ex["qlora"] and ex["heldout_loss_adapter"] < ex["heldout_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": "cpu"})
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    tok = load_tokenizer(out)
    held = training_examples(tok, ctx.task, TRAIN["samples"] + 16, TRAIN["seq_len"], ctx.seed)[:16]
    reloaded = eval_loss(model, held, tok.pad_token_id, "cpu")
    assert abs(reloaded - ex["heldout_loss_merged"]) < 1e-3       # what was measured is what was saved
    assert reloaded < ex["heldout_loss_before"]


# --- runner failures -----------------------------------------------------------------------------------------------

def test_failure_leaves_nothing(tiny_model_dir, tmp_path, ctx):
    out = tmp_path / "fail"
    recs = run([{"method": "magnitude", "params": {"sparsity": 0.3}},
                {"method": "lora", "params": {"targets": ["no_such_module"], "steps": 1}}], tiny_model_dir, out, ctx)
    assert [r.status for r in recs] == ["ok", "failed"]
    assert recs[-1].reason.startswith("config:") and "no_such_module" in recs[-1].reason
    assert not out.exists() and not out.with_name("fail.work").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert Path(recs[-1].log_path).is_file() and "no_such_module" in Path(recs[-1].log_path).read_text()


def test_failure_kinds(tiny_model_dir, tmp_path, ctx):
    from dataclasses import replace

    from acf.methods.run_steps import classify

    rec = run([{"method": "rtn"}], tmp_path / "vanished", tmp_path / "o1", ctx)[-1]
    assert rec.status == "failed" and "missing" in rec.reason
    if not torch.cuda.is_available():
        rec = run([{"method": "rtn"}], tiny_model_dir, tmp_path / "o2", replace(ctx, device="cuda"))[-1]
        assert rec.reason.startswith("no_cuda:") and not (tmp_path / "o2").exists()
    assert classify("x", torch.OutOfMemoryError("CUDA out of memory")).kind == "oom"
    assert classify("x", RuntimeError("mat1 and mat2 shapes cannot be multiplied")).kind == "shape"
    assert classify("x", ValueError("something else")).kind == "library"


# --- subagents -----------------------------------------------------------------------------------------------------

def test_subagent_cards_bind_callable_tools(tiny_model_dir, tmp_path, data_root):
    from acf.coordinator.subagents import bind_cards

    bound = bind_cards()
    assert {"quantization", "pruning", "distillation", "lora", "evaluation"} <= set(bound)
    for name, (card, tools) in bound.items():
        assert card.prompt and card.description and tools
        assert all(t.args_schema is not None for t in tools)
    tools = {t.name: t for t in bound["pruning"][1]}
    bad = tools["validate_strategy"].invoke({"strategy_json": '[{"method": "gptq", "params": {"bits": 5}}]'})
    assert bad["ok"] is False and bad["problems"]
    est = tools["estimate_cost"].invoke({"strategy_json": '[{"method": "drop_layers", "params": {"count": 1}}]',
                                         "model_dir": str(tiny_model_dir)})
    assert est["estimate"] is True and est["steps"][0]["estimated_seconds"] > 0
    res = tools["prune"].invoke({"model_dir": str(tiny_model_dir), "out_dir": str(tmp_path / "p"),
                                 "method": "magnitude", "params": {"sparsity": 0.4}})
    assert res["status"] == "ok" and (tmp_path / "p" / "config.json").is_file()
    wrong = tools["prune"].invoke({"model_dir": str(tiny_model_dir), "out_dir": str(tmp_path / "q"), "method": "gptq"})
    assert wrong["status"] == "failed"
    ev = tools["evaluate"].invoke({"model_dir": str(tmp_path / "p"), "metrics": ["size"], "limit": 2})
    assert ev["status"] == "ok" and ev["metrics"]["size"]["value"] > 0


# --- real model ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gptq_w4_g64_on_default_model(smol_dir, tmp_path, ctx):
    out = tmp_path / "smol-gptq"
    rec = run_ok([{"method": "gptq", "params": {"bits": 4, "group_size": 64, "calib_samples": 8, "seq_len": 128}}],
                 smol_dir, out, ctx)[0]
    from acf.core.instruments import dir_size
    assert dir_size(out) < 0.75 * dir_size(smol_dir)
    model = load_plain(out)
    w = model.model.layers[0].mlp.down_proj.weight.detach().float()
    assert max(int(r.unique().numel()) for r in w.reshape(-1, 64)) <= 16


def test_step_log_keeps_terminal_quiet(tmp_path):
    """A step's log file gets library INFO lines, but the handlers already on the terminal keep the user's
    threshold (the demo used to print every model config transformers loaded)."""
    import io
    import logging

    from acf.methods.run_steps import _step_log

    lg, root = logging.getLogger("transformers"), logging.getLogger()
    term, root_term = io.StringIO(), io.StringIO()
    h, rh = logging.StreamHandler(term), logging.StreamHandler(root_term)
    old, old_prop = lg.level, lg.propagate
    lg.addHandler(h)
    root.addHandler(rh)
    lg.setLevel(logging.ERROR)
    lg.propagate = True   # transformers propagates to the root handler when CI is set
    try:
        with _step_log(tmp_path / "step.log", logging.getLogger("acf.methods")):
            logging.getLogger("transformers.configuration_utils").info("loading configuration file")
            lg.error("real problem")
        assert not h.filters and not rh.filters and lg.level == logging.ERROR   # restored
    finally:
        lg.removeHandler(h)
        root.removeHandler(rh)
        lg.setLevel(old)
        lg.propagate = old_prop
    assert "loading configuration file" in (tmp_path / "step.log").read_text()
    for shown in (term.getvalue(), root_term.getvalue()):
        assert "real problem" in shown and "loading configuration" not in shown


def test_step_log_keeps_compressed_tensors_and_autoround_off_the_terminal(tmp_path):
    """compressed-tensors' "Could not match" WARNING per Linear (AutoRound allocations, 210 lines an episode on the
    GPU) and auto-round's own handler (made inside an earlier step, its stream now the terminal) reach the step
    log only, once setup_logging has set the terminal's threshold."""
    import io
    import logging
    import os

    from acf.core.logsetup import setup_logging
    from acf.methods.run_steps import _step_log

    root, ar = logging.getLogger(), logging.getLogger("autoround")
    root_term, ar_term = io.StringIO(), io.StringIO()
    rh, ah = logging.StreamHandler(root_term), logging.StreamHandler(ar_term)
    saved = {n: logging.getLogger(n).level for n in ("compressed_tensors", "autoround")}
    env = os.environ.get("AR_LOG_LEVEL")
    root.addHandler(rh)
    ar.addHandler(ah)
    try:
        setup_logging(False)
        assert os.environ["AR_LOG_LEVEL"] == "ERROR"
        with _step_log(tmp_path / "step.log", logging.getLogger("acf.methods")):
            logging.getLogger("compressed_tensors.utils.match").warning("Could not match `model.layers.3.mlp`")
            ar.info("Applying AutoRound on layer model.layers.0")
    finally:
        root.removeHandler(rh)
        ar.removeHandler(ah)
        for n, lvl in saved.items():
            logging.getLogger(n).setLevel(lvl)
        if env is None:
            os.environ.pop("AR_LOG_LEVEL", None)
    log = (tmp_path / "step.log").read_text()
    assert "Could not match" in log and "Applying AutoRound" in log
    assert "Could not match" not in root_term.getvalue() and "Applying AutoRound" not in ar_term.getvalue()


def test_compress_cli_keeps_library_chatter_in_step_logs(tiny_model_dir, tmp_path, data_root):
    """Two llm-compressor steps in one process: the second used to print every module's GPTQ METRIC lines and
    every model config on the terminal (llm-compressor installs its console sink on first import)."""
    import os
    import subprocess
    import sys

    strategy = {"steps": [{"method": "wanda", "params": {"sparsity": 0.5, **CAL}},
                          {"method": "gptq", "params": {"bits": 4, "group_size": 32, **CAL}}]}
    r = subprocess.run([sys.executable, "-m", "acf.cli.main", "compress", "--model", str(tiny_model_dir), "--out",
                        str(tmp_path / "out"), "--strategy", json.dumps(strategy)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    shown = r.stdout + r.stderr
    assert "METRIC" not in shown and "Model config" not in shown and "Calibrating" not in shown, shown[-3000:]
    assert "model written to" in r.stdout
    assert "METRIC" in (tmp_path / "out.logs" / "step-02-gptq.log").read_text()   # kept, in its step's log


def test_memory_lean_recovery_paths_run_on_the_cpu_too(tiny_model_dir, tmp_path, ctx):
    """The paths an 8B model takes on a GPU (adapters on a frozen base, gradient checkpointing), forced on a tiny
    model: the plan is recorded with its memory estimate, training lowers the loss, pruned weights stay zero and
    the saved config keeps the KV cache on."""
    import json

    recs = run_ok([{"method": "magnitude", "params": {"sparsity": 0.5}},
                   {"method": "distill", "params": {"adapters": True, "adapter_rank": 8, "gradient_checkpointing": True,
                                                    "steps": 8, "batch_size": 2, "seq_len": 64, "samples": 16,
                                                    "lr": 2e-3}},
                   {"method": "lora", "params": {"gradient_checkpointing": True, "steps": 4, "batch_size": 2,
                                                 "seq_len": 64, "samples": 24, "lr": 1e-3}}],
                  tiny_model_dir, tmp_path / "lean", ctx)
    d, lo = recs[1].extra, recs[2].extra
    assert d["plan"] == {"adapters": True, "student_dtype": "float32", "gradient_checkpointing": True}
    assert d["loss_last5_mean"] < d["loss_first5_mean"]
    assert abs(d["sparsity_after"] - d["sparsity_before"]) < 1e-3 and d["sparsity_before"] > 0.4
    assert lo["plan"]["gradient_checkpointing"] and lo["memory_estimate"]["estimated_peak_bytes"] > 0
    assert lo["sparsity_kept"]
    assert json.loads((tmp_path / "lean" / "config.json").read_text()).get("use_cache") is True


# --- temporary folders belong to the process that made them ---------------------------------------------------------

#: `acf compress` whose step, once its output is written into the `.tmp-*` folder, waits for FLAGS/go: a second
#: process then runs while this one's temporary folder is certainly in flight
_HELD_COMPRESS = r"""
import sys, time
from pathlib import Path
import acf.methods.run_steps as runner

flags, real = Path(sys.argv[1]), runner.get_impl

def held(method):
    fn = real(method)
    def step(params, in_dir, out_dir, ctx):
        extra = fn(params, in_dir, out_dir, ctx)
        (flags / "written").write_text(str(out_dir))
        while not (flags / "go").exists():
            time.sleep(0.1)
        return extra
    return step

runner.get_impl = held
sys.argv = ["acf"] + sys.argv[2:]
from acf.cli.main import main
main()
"""


def test_concurrent_compress_into_one_parent(tiny_model_dir, data_root, tmp_path):
    """Two `acf compress` processes into one parent folder: the second's start-up clean-up used to delete the
    first's in-flight `.tmp-*` folder (FileNotFoundError .../tokenizer.json); now both finish intact, and only a
    leftover of a pid that no longer runs is removed."""
    import os
    import subprocess
    import sys
    import tempfile

    from acf.core.atomic import tmp_prefix
    from acf.models.loading import check_weights

    parent, flags = tmp_path / "out", tmp_path / "flags"
    parent.mkdir()
    flags.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = Path(tempfile.mkdtemp(prefix=tmp_prefix(parent / "old"), dir=parent))
    leftover = leftover.rename(parent / leftover.name.replace(f"@{os.getpid()}@", f"@{dead.pid}@"))
    strategy = json.dumps({"steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}}]})
    args = ["compress", "--model", str(tiny_model_dir), "--strategy", strategy, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen([sys.executable, "-c", _HELD_COMPRESS, str(flags), *args, "--out", str(parent / "a")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        import time

        t0 = time.time()
        while not (flags / "written").exists() and a.poll() is None and time.time() - t0 < 300:
            time.sleep(0.2)
        assert a.poll() is None, a.communicate()[0][-3000:]
        a_tmp = [p for p in parent.glob(".tmp-a@*") if p.name.split("@")[2] == str(a.pid)]
        assert len(a_tmp) == 1 and (a_tmp[0] / "config.json").is_file()
        b = subprocess.run([sys.executable, "-m", "acf.cli.main", *args, "--out", str(parent / "b")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
        assert a_tmp[0].is_dir() and not leftover.exists()      # A's live folder kept, the dead pid's removed
        (flags / "go").write_text("")
        out, _ = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, out[-3000:]
    for name in ("a", "b"):
        d = parent / name
        assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
        check_weights(d)
    assert not list(parent.glob(".tmp-*"))
