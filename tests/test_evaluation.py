"""The evaluation subagent on a tiny random-init model and, once, on the real default model."""

import json
import math
import subprocess
import sys

import pytest

from acf.core.errors import AcfError
from acf.evaluation import evaluate
from acf.tasks import get_task


def test_all_metrics_on_tiny_model(tiny_model_dir, data_root):
    task = get_task("gsm8k")
    r = evaluate(tiny_model_dir, task, ["answer_nll", "accuracy", "latency", "memory", "size", "params", "sparsity",
                                        "bits_per_weight"], limit=4, accuracy_limit=2, max_new_tokens=8,
                 latency_tokens=4, show_progress=False)
    m = r.metrics
    # random init over a 49k vocab: NLL near ln(49152) ~ 10.8
    assert 8 < m["answer_nll"].value < 13 and m["answer_nll"].n == 4
    assert m["accuracy"].n == 2 and m["accuracy"].ci95 is not None and len(r.predictions) == 2
    assert all({"id", "target", "extracted", "correct", "completion"} <= set(p) for p in r.predictions)
    assert m["latency"].value > 0 and m["latency"].unit == "ms/token" and "ttft_ms" in m["latency"].extra
    assert m["memory"].value > 0 and m["memory"].how == "measured"
    assert m["size"].value == sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert m["bits_per_weight"].value == pytest.approx(32.0, rel=0.01)  # saved in float32
    assert m["sparsity"].value < 0.01
    assert all(v.device for k, v in m.items() if k not in ("size", "bits_per_weight"))


def test_metric_errors(tiny_model_dir, data_root):
    with pytest.raises(AcfError, match="unknown metric"):
        evaluate(tiny_model_dir, get_task("gsm8k"), ["answer_nll", "bogus"], limit=2, show_progress=False)


def _acf(*args, env=None):
    return subprocess.run([sys.executable, "-m", "acf.cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=1200)


def acf_inproc(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process (fast: no second torch import); returns (exit code, stderr)."""
    from cli_run import run_cli

    code, _, err = run_cli(capsys, *args)
    return code, err


@pytest.mark.parametrize("args,msg", [
    (["eval", "--model", "nope-model"], "unknown model"),
    (["eval", "--limit", "0"], "--limit must be"),
    (["eval", "--metrics", "answer_nll,bogus"], "unknown metric"),
    (["eval", "--dataset", "gsm8k", "--data-dir", "/nonexistent"], "no such directory"),
    (["run", "--episodes", "0"], "--episodes must be"),
    (["run", "--objectives", "answer_nll"], "at least 2"),
    (["run", "--sampler", "bogus"], "unknown sampler"),
    (["run", "--preset", "bogus"], "unknown preset"),
    (["run", "--objectives", "answer_nll,foo"], "unknown objective"),
    (["run", "--recover-steps", "25,lots"], "--recover-steps takes whole numbers"),
    (["run", "--recover-steps", "0"], "--recover-steps: give one or more"),
    (["run", "--final-limit", "5", "--final-metrics", "kld,mc2"], "--final-metrics: mc2 not measured on this task"),
    (["run", "--recipes", "gptq_w4g64_ao,bogus"], "--recipes: bogus is not a recipe name"),
    (["run", "--calib-mix", "1.5"], "--calib-mix is the share"),
    (["run", "--limit", "abc"], "Invalid value for '--limit'"),          # typer's own parse errors: one line too
    (["run", "--no-such-option"], "No such option: --no-such-option"),
])
def test_cli_bad_input_one_line_exit_2(args, msg, tmp_path, capsys):
    extra = ["--run-dir", str(tmp_path / "r")] if args[0] == "run" else []
    code, err = acf_inproc(capsys, *args, *extra)
    assert code == 2, err
    assert msg in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "r" / "frontier.json").exists()


def test_cli_run_dir_under_a_file(tmp_path, capsys):
    """`--run-dir FILE/x` (e.g. /etc/passwd/x): one line naming the file in the way, not a NotADirectoryError."""
    f = tmp_path / "a-file"
    f.write_text("")
    code, err = acf_inproc(capsys, "run", "--run-dir", str(f / "x"), "--limit", "2")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"--run-dir {f / 'x'}" in err and f"{f} is a file, not a directory" in err


def test_cli_truncated_weights_one_line(tiny_model_dir, tmp_path, capsys):
    """A model whose model.safetensors was cut in half is refused before loading, naming the file (it was a
    SafetensorError traceback from inside transformers)."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    f = cut / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    for args in (["eval", "--limit", "2"], ["run", "--run-dir", str(tmp_path / "r"), "--limit", "2"]):
        code, err = acf_inproc(capsys, *args, "--model", str(cut))
        assert code == 2 and err.strip().count("\n") == 0, err
        assert f"{f} is not a complete safetensors file" in err and "cut short" in err
    assert not (tmp_path / "r").exists()   # refused before the run directory is written


def test_cli_interactive_needs_a_terminal(tmp_path):
    """`acf run --interactive </dev/null` stops at once with one line, before any model loads or run dir is made."""
    r = subprocess.run([sys.executable, "-m", "acf.cli.main", "run", "--interactive", "--run-dir",
                        str(tmp_path / "r")], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--interactive" in r.stderr and "stdin is not a terminal" in r.stderr
    assert not (tmp_path / "r").exists()


def test_cli_device_cuda_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    code, err = acf_inproc(capsys, "eval", "--device", "cuda", "--limit", "2")
    assert code == 2 and "CUDA is not available" in err


@pytest.mark.slow
def test_default_model_integration(smol_dir, data_root, tmp_path):
    """Real SmolLM2-135M: answer NLL on 4 items and accuracy on 2, through the CLI with --json."""
    out = tmp_path / "out.json"
    r = _acf("eval", "--model", "smollm2-135m", "--dataset", "gsm8k", "--limit", "4", "--metrics",
             "answer_nll,accuracy,size,params", "--max-new-tokens", "96", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    nll = d["metrics"]["answer_nll"]
    assert 0.8 < nll["value"] < 2.2 and nll["n"] == 4 and nll["how"] == "measured" and nll["device"]
    assert d["metrics"]["accuracy"]["n"] == 4 and len(d["predictions"]) == 4
    assert d["metrics"]["params"]["value"] == 134515008
    assert math.isclose(d["metrics"]["size"]["value"], 272e6, rel_tol=0.05)


def test_gsm8k_answer_is_done_only_after_its_newline():
    """Digits are single tokens: a check between '1' and '8' must not end '#### 18' as '#### 1'."""
    import re

    from acf.evaluation.quality import GSM8K_DONE

    assert re.search(GSM8K_DONE, "so she pays 18.\n#### 1") is None
    assert re.search(GSM8K_DONE, "so\n#### 1,842\nmore")
    assert re.search(GSM8K_DONE, "#### $18.50 \n")


def test_answer_done_checks_only_running_rows(tiny_model_dir):
    import torch

    from acf.evaluation.generate import AnswerDone
    from acf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompt = tok(["Q"], add_special_tokens=False)["input_ids"][0]
    rows = [prompt + tok("#### 7\nok", add_special_tokens=False)["input_ids"],
            prompt + tok("still thinking..", add_special_tokens=False)["input_ids"]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id or 0] * (L - len(r)) for r in rows])
    crit = AnswerDone(tok, len(prompt), r"####\s*\d+[ \t]*\n", every=1)
    done = crit(ids)
    assert done.tolist() == [True, False]
    crit.done[0] = True                     # a finished row stays finished and is not decoded again
    assert crit(ids).tolist() == [True, False]


def test_auto_batch_size_follows_memory_per_sequence(tiny_model_dir):
    from types import SimpleNamespace

    from acf.evaluation.batching import CPU_BATCH, auto_batch_size, kv_bytes_per_token, per_sequence_bytes
    from acf.models.loading import load_model

    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                          intermediate_size=128, vocab_size=1000)
    assert kv_bytes_per_token(cfg, 2) == 2 * 2 * 2 * 16 * 2
    assert per_sequence_bytes(cfg, "score", 100) > per_sequence_bytes(cfg, "generate", 100)
    # generation: the larger of the whole KV cache (last step) and the prompt's KV plus one layer's activations
    # (prefill), not their sum over every token; without new_tokens the old upper bound
    kv, act = kv_bytes_per_token(cfg, 2), (64 * 4 + 128 * 2) * 2
    assert per_sequence_bytes(cfg, "generate", 444, new_tokens=256) == max(kv * 444, (kv + act) * 188)
    assert per_sequence_bytes(cfg, "generate", 444) == (kv + act) * 444
    big = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                          intermediate_size=14336, vocab_size=128256)   # Llama-3.1-8B: the last step's KV decides
    assert per_sequence_bytes(big, "generate", 444, new_tokens=256) == kv_bytes_per_token(big, 2) * 444
    model, _ = load_model(tiny_model_dir, "cpu")
    assert auto_batch_size(model, 1000, "generate", 512) == CPU_BATCH   # CPU keeps a fixed small batch
    assert auto_batch_size(model, 3, "generate", 512) == 3


def test_size_counts_the_loadable_model_not_its_extras(tmp_path):
    from acf.evaluation.perf import size_metric

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"y" * 500)
    m = size_metric(tmp_path)
    assert m.value == 1002
    assert m.extra["not_counted"] == {"adapter/": 500}


def test_generation_engine_is_checked_and_cut_points_match_the_padded_stopping(smol_dir, monkeypatch):
    """An unknown ACF_GEN_ENGINE is refused by name; `cut_point` (how continuous batching and vLLM completions are
    cut) stops where AnswerDone's check would: at the first multiple of `every` whose window shows the pattern."""
    from acf.core.errors import AcfError
    from acf.evaluation.generate import AnswerDone, cut_point, generate_all
    from acf.models.loading import load_tokenizer

    tok = load_tokenizer(smol_dir)
    monkeypatch.setenv("ACF_GEN_ENGINE", "turbo")
    with pytest.raises(AcfError, match="ACF_GEN_ENGINE='turbo': one of padded"):
        generate_all(_FakeModel(), tok, ["x"], 4, batch_size=1)
    ids = tok("The sum is 12.\n#### 12\nThen more text follows here.", add_special_tokens=False)["input_ids"]
    crit = AnswerDone(tok, 0, r"####\s*\d+\s*\n", every=4)
    k = cut_point(crit, ids)
    assert k % 4 == 0 and "#### 12\n" in tok.decode(ids[:k]) and "#### 12\n" not in tok.decode(ids[:k - 4])
    assert cut_point(AnswerDone(tok, 0, None), ids) == len(ids)


class _FakeModel:
    """Only what generate_all reads before choosing an engine: a parameter's device."""

    def parameters(self):
        import torch

        yield torch.zeros(1)


def test_generation_halves_its_batch_when_memory_runs_out(monkeypatch):
    """A batch the memory plan got wrong is halved and the rest goes on: every prompt answered, in order, and the
    engine description says so; a single row that does not fit still fails."""
    import torch

    import acf.evaluation.generate as gen

    calls: list[int] = []

    def fake_batch(model, tok, prompts, new, **kw):   # stands in for transformers generate: OOM above 2 rows
        calls.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [(p.upper(), 1) for p in prompts]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr(gen, "generate_batch", fake_batch)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    outs, how = gen.generate_all(M(), None, prompts, 4, batch_size=8)
    assert [o[0] for o in outs] == [p.upper() for p in prompts]
    assert calls[:3] == [5, 4, 2] and "8, then 2 after running out of GPU memory" in how
    monkeypatch.setattr(gen, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):
        gen.generate_all(M(), None, ["xyz"], 4, batch_size=4)


def test_cli_calibration_the_data_cannot_fill(tmp_path, capsys):
    """128 windows of 512 tokens with a quarter of general text need 16,384 general tokens; the shipped general
    train text (the other tasks' train parts) holds about 10,800: refused at the start, in one line naming the
    settings to change, before the run directory is written (every calibrated episode failed alike on the GPU)."""
    code, err = acf_inproc(capsys, "run", "--run-dir", str(tmp_path / "r"), "--calib-samples", "128",
                           "--seq-len", "512", "--limit", "2")
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "the general calibration text holds" in err and "--calib-mix" in err
    assert not (tmp_path / "r").exists()
