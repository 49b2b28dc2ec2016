"""Foundation: answer extraction, Wilson interval, data loading errors, model resolution errors, spec, strategy."""

import json
import os
from pathlib import Path

import pytest

from acf.tasks.data import subset
from acf.core.errors import AcfError, DataError, ModelNotFound, StrategyError
from acf.core.intervals import wilson_interval
from acf.models.loading import resolve_device, resolve_model
from acf.models.spec import infer_spec
from acf.methods.strategy import validate_strategy
from acf.tasks import get_task
from acf.tasks.gsm8k import extract_answer


@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### $18.00", "18"),
    ("The answer is 3.50 dollars.", "3.5"),
    ("first 4 then 12.", "12"),
    ("#### -5", "-5"),
    ("total $1,000,000", "1000000"),
    ("no number here", None),
    ("#### \nbut later 42", "42"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_wilson():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and 0.25 < hi < 0.32
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_subset_deterministic():
    rows = list(range(100))
    assert subset(rows, 10, 3) == subset(rows, 10, 3)
    assert subset(rows, 10, None) == list(range(10))
    with pytest.raises(DataError):
        subset(rows, 0, 0)
    with pytest.raises(DataError):
        subset(rows, -1, 0)


def test_gsm8k_loads_from_acf_data_dir(data_root):
    items = get_task("gsm8k").load("test", limit=5, seed=0)
    assert len(items) == 5 and all(it.target is not None and "<<" not in it.reference for it in items)
    for split in ("test", "train"):   # the shipped files pass the final-answer check: every line has '#### <n>'
        assert all(it.target is not None for it in get_task("gsm8k").load(split, seed=None))
    texts = get_task("gsm8k").train_texts(3)
    assert len(texts) == 3 and all("Answer:" in t for t in texts)


def test_data_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such directory"):
        get_task("gsm8k", str(tmp_path / "missing")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="test.jsonl"):
        get_task("gsm8k", str(tmp_path / "empty")).load()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        get_task("gsm8k", str(bad)).load()
    (bad / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: missing field\(s\) answer"):
        get_task("gsm8k", str(bad)).load()
    # an answer without its final '#### <number>' has no target: refused at its line (blank lines counted), not
    # scored against the last number of the solution or against nothing
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "2 + 4 = 6\\n#### 6"}\n\n'
                                    '{"question": "q", "answer": "six"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:3: answer has no final '#### <number>'.*'six'"):
        get_task("gsm8k", str(bad)).load()
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "2 + 4 = 6\\n#### six"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: answer's final '####' is not followed by a number"):
        get_task("gsm8k", str(bad)).load()
    with pytest.raises(DataError, match="unknown task"):
        get_task("nope")
    # neither local data nor hub: one message naming both ways out
    monkeypatch.setenv("ACF_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="--data-dir"):
        get_task("gsm8k").load()


def test_model_errors(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model"):
        resolve_model("no-such-alias")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path / "m"))
    # A hub id that cannot be reached (offline here) fails with one message naming the way out.
    with pytest.raises(ModelNotFound, match="--model /local/dir"):
        resolve_model("some-org/some-model-that-is-not-cached", offline=True)


def test_truncated_safetensors_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    import shutil

    from acf.models.loading import check_weights, load_model

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    f = cut / "model.safetensors"
    check_weights(cut)   # complete: passes
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    for load in (lambda: resolve_model(str(cut)), lambda: load_model(cut)):
        with pytest.raises(ModelNotFound, match=rf"{f}.*cut short"):
            load()


def test_tmp_dirs_are_removed_only_when_their_process_is_gone(tmp_path):
    """`atomic_dir` temporaries carry host and pid; `clean_partial_dirs` removes one only when it is this host's
    and its pid no longer runs (or it predates owners), so a concurrent process's folder survives."""
    import subprocess
    import sys

    from acf.core.atomic import atomic_dir, clean_partial_dirs, tmp_owner, tmp_prefix

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        mine = tmp_prefix(tmp_path / "m")                         # .tmp-m@<host>@<pid>@
        host, pid = tmp_owner(mine + "abc")
        assert pid == os.getpid()

        def plant(name: str) -> Path:
            (tmp_path / name).mkdir()
            (tmp_path / name / "tokenizer.json").write_text("{}")
            return tmp_path / name

        of_dead = plant(mine.replace(f"@{pid}@", f"@{dead.pid}@") + "d1")
        of_live = plant(mine.replace(f"@{pid}@", f"@{live.pid}@") + "l1")
        of_mine = plant(mine + "s1")
        elsewhere = plant(mine.replace(f"@{host}@", "@another-host@").replace(f"@{pid}@", f"@{dead.pid}@") + "h1")
        legacy = plant(".tmp-m-k2j4x9")                            # named before names carried an owner
        with atomic_dir(tmp_path / "x") as t:
            assert tmp_owner(t) == (host, os.getpid())
            assert sorted(clean_partial_dirs(tmp_path)) == sorted([of_dead, legacy])
            assert t.is_dir()
        assert of_live.is_dir() and of_mine.is_dir() and elsewhere.is_dir() and (tmp_path / "x").is_dir()
        live.kill()
        live.wait()
        assert clean_partial_dirs(tmp_path) == [of_live]
    finally:
        live.kill()
        live.wait()


def test_device_errors():
    import torch

    assert resolve_device(None) in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(AcfError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(AcfError):
        resolve_device("tpu")


def test_default_model_import_is_clean(smol_dir):
    cfg = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    assert not any(p.name.startswith(".tmp-") for p in smol_dir.parent.iterdir())


def test_spec_group_sizes(smol_dir):
    s = infer_spec(smol_dir)
    assert 32 in s.valid_group_sizes and 64 in s.valid_group_sizes and 128 not in s.valid_group_sizes
    assert s.params == 134515008 and s.tied_embeddings


def test_strategy_validation_lists_every_problem(smol_dir):
    s = infer_spec(smol_dir)
    ok = validate_strategy({"steps": [{"method": "gptq", "params": {"bits": 4, "group_size": 64}}]}, s)
    assert ok.steps[0].params["calib_samples"] == 64  # defaults filled
    with pytest.raises(StrategyError) as e:
        validate_strategy({"steps": [{"method": "gptq", "params": {"bits": 5, "group_size": 128}},
                                     {"method": "sparsegpt", "params": {"sparsity": 1.2}},
                                     {"method": "nope"}]}, s)
    msg = str(e.value)
    for part in ("bits", "group_size 128", "sparsity", "unknown method 'nope'", "q_proj (576 wide)" if False else "valid for this model"):
        assert part in msg, part
    with pytest.raises(StrategyError, match="count 30 must be below"):
        validate_strategy({"steps": [{"method": "drop_layers", "params": {"count": 30}}]}, s)
    with pytest.raises(StrategyError, match="qlora needs a bnb 4-bit base"):
        validate_strategy({"steps": [{"method": "lora", "params": {"qlora": True}}]}, s)
    with pytest.raises(StrategyError, match="not valid JSON"):
        validate_strategy('{"steps": [', s)
    with pytest.raises(StrategyError, match="order must be"):
        validate_strategy({"steps": [{"method": "rtn"}, {"method": "magnitude"}]}, s)
    with pytest.raises(StrategyError, match="only one quantization"):
        validate_strategy({"steps": [{"method": "rtn"}, {"method": "gptq"}]}, s)
    with pytest.raises(StrategyError, match="implies sparsity"):
        validate_strategy({"steps": [{"method": "wanda", "params": {"sparsity": 0.3, "pattern": "2:4"}}]}, s)
    # bnb then qlora is the one allowed recovery after quantization
    validate_strategy({"steps": [{"method": "bnb_nf4"}, {"method": "lora", "params": {"qlora": True}}]}, s)
