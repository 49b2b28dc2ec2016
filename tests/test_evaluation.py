"""The evaluation subagent on a tiny random-init model and, once, on the real default model."""

import json
import math
import subprocess
import sys

import pytest

from acf.errors import AcfError
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
    return subprocess.run([sys.executable, "-m", "acf.cli", *args], capture_output=True, text=True, env=env,
                          timeout=1200)


def acf_inproc(capsys, *args) -> tuple[int, str]:
    """Run the CLI in this process (fast: no second torch import); returns (exit code, stderr)."""
    from acf import cli

    old = sys.argv
    sys.argv = ["acf", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


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
])
def test_cli_bad_input_one_line_exit_2(args, msg, tmp_path, capsys):
    extra = ["--run-dir", str(tmp_path / "r")] if args[0] == "run" else []
    code, err = acf_inproc(capsys, *args, *extra)
    assert code == 2, err
    assert msg in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "r" / "frontier.json").exists()


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
             "answer_nll,accuracy,size,params", "--max-new-tokens", "160", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    nll = d["metrics"]["answer_nll"]
    assert 0.8 < nll["value"] < 2.2 and nll["n"] == 4 and nll["how"] == "measured" and nll["device"]
    assert d["metrics"]["accuracy"]["n"] == 4 and len(d["predictions"]) == 4
    assert d["metrics"]["params"]["value"] == 134515008
    assert math.isclose(d["metrics"]["size"]["value"], 272e6, rel_tol=0.05)
