"""The calibration mix (StepContext.calib_mix): a share of calibration windows and kd_tune examples from general
text (other tasks' train splits), never the run's task and never the kld_general evaluation text."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from acf.core.errors import MethodFailed
from acf.evaluation import general_text
from acf.evaluation.general_text import general_texts, general_train_pool, general_train_texts, render
from acf.methods.base import StepContext
from acf.methods.calibration import (calibration_dataset, calibration_facts, calibration_ids, general_count,
                                     interleave, mix_order, training_examples)
from acf.tasks import get_task

N, L = 8, 32


@pytest.fixture(scope="module")
def task(data_root):
    return get_task("gsm8k")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from acf.models.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _packed(tok, texts: list[list[int]], n: int, seq_len: int) -> torch.Tensor:
    """The packing rule written out: texts joined with EOS (once), cut into n windows."""
    stream: list[int] = []
    for ids in texts:
        stream += ids + ([] if ids and ids[-1] == tok.eos_token_id else [tok.eos_token_id])
    assert len(stream) >= n * seq_len
    return torch.tensor(stream[:n * seq_len]).view(n, seq_len)


def _general_ids(tok, k: int) -> list[list[int]]:
    from acf.models.tokenization import encode_prompt

    return [encode_prompt(tok, t) for t in general_train_texts("gsm8k", k, 0)]


# --- general text: sources, disjointness, order ---------------------------------------------------------------------

@pytest.mark.parametrize("exclude", ["gsm8k", "truthfulqa", "commonsenseqa", "humaneval", "bbh:date_understanding"])
def test_general_train_text_never_holds_the_run_task_nor_evaluation_text(exclude, data_root):
    pool, used = general_train_pool(exclude, 0)
    base = exclude.partition(":")[0]
    assert base not in used and used and all(s in general_text.SOURCES for s in used)
    assert not any(i.startswith(f"{base}/") for i, _ in pool)
    texts = {t for _, t in pool}
    if base in general_text.SOURCES:       # the run's own items, train and test, rendered the same way
        own = get_task(base)
        assert not texts & {render(it) for split in ("train", "test") for it in own.load(split, None, None)}
    for part in ("search", "report"):      # kld_general's evaluation text, by text identity
        evaluated, _ = general_texts(exclude, part)
        assert evaluated and not texts & {t for _, t in evaluated}
    for name in used:                      # and no item of any source's test split at all
        assert not texts & {render(it) for it in get_task(name).load("test", None, None)}


def test_general_train_text_is_round_robin_deterministic_and_prefix_stable(data_root):
    pool, used = general_train_pool("gsm8k", 0)
    assert used == ["truthfulqa", "humaneval", "commonsenseqa"]
    k = len(used)
    # every prefix is balanced: the first 3 * 20 texts hold 20 of each (humaneval's train split has 20)
    for m in (1, 5, 20):
        heads = [i.partition("/")[0] for i, _ in pool[:k * m]]
        assert all(heads.count(s) == m for s in used), m
    assert general_train_texts("gsm8k", 10, 0) == general_train_texts("gsm8k", 40, 0)[:10]
    assert general_train_texts("gsm8k", 40, 0) == general_train_texts("gsm8k", 40, 0)
    assert general_train_texts("gsm8k", 40, 1) != general_train_texts("gsm8k", 40, 0)
    # a source that runs out is skipped, the others continue; all of the pool is there, each item once
    assert len(pool) == len({i for i, _ in pool}) == sum(len(get_task(s).load("train", None, None)) for s in used)


def test_missing_source_left_out_and_none_is_a_data_failure(tmp_path, monkeypatch, task, tok, data_root):
    root = tmp_path / "data"
    root.mkdir()
    (root / "truthfulqa").symlink_to(data_root / "truthfulqa")
    own = get_task("gsm8k", data_dir=str(data_root / "gsm8k"))      # the run's data stays reachable
    monkeypatch.setenv("ACF_DATA_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pool, used = general_train_pool("gsm8k", 0)
    assert used == ["truthfulqa"] and all(i.startswith("truthfulqa/") for i, _ in pool)
    monkeypatch.setattr(general_text, "SOURCES", ("gsm8k", "humaneval"))   # humaneval's data is not under root
    with pytest.raises(MethodFailed, match="general text") as e:
        calibration_ids(tok, own, N, L, 0, "gptq", general=0.25)
    assert e.value.kind == "data" and e.value.method == "gptq"
    with pytest.raises(MethodFailed, match="general text"):
        training_examples(tok, own, N, 64, 0, "kd_tune", general=0.5)
    assert calibration_ids(tok, own, N, L, 0, "gptq").shape == (N, L)        # no mix: no general text needed


# --- calibration windows ----------------------------------------------------------------------------------------------

def test_share_rounding_and_order():
    assert [general_count(8, g) for g in (0.0, 0.1, 0.25, 0.5, 1.0)] == [0, 1, 2, 4, 8]
    assert general_count(1, 0.5) == 1 and general_count(16, 0.03) == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(MethodFailed, match="0..1") as e:
            general_count(8, bad, "gptq")
        assert e.value.kind == "config"
    assert mix_order(6, 2) == [False, False, False, True, False, False, False, True]
    assert mix_order(4, 0) == [False] * 4 and mix_order(0, 3) == [True] * 3
    assert interleave(list("abcdef"), [1, 2]) == ["a", "b", "c", 1, "d", "e", "f", 2]


def test_zero_mix_is_todays_tensor(tok, task):
    from acf.evaluation.sequences import task_sequences

    default = calibration_ids(tok, task, N, L, 0)
    assert torch.equal(calibration_ids(tok, task, N, L, 0, "calibration", 0.0), default)
    # today's rule: the task's train pairs in evaluation's prompt format, packed with EOS
    pairs = [list(s.prompt + s.target) for s in task_sequences(task, tok, task.train_pairs(16, seed=0))]
    assert torch.equal(default, _packed(tok, pairs, N, L))


def test_mix_honours_its_proportions(tok, task):
    mixed = calibration_ids(tok, task, N, L, 0, "gptq", general=0.25)
    task_only = calibration_ids(tok, task, 6, L, 0)
    general_only = calibration_ids(tok, task, 2, L, 0, "gptq", general=1.0)
    assert mixed.shape == (N, L)
    where = mix_order(6, 2)
    assert torch.equal(mixed[[i for i, g in enumerate(where) if not g]], task_only)
    assert torch.equal(mixed[[i for i, g in enumerate(where) if g]], general_only)
    # the general windows are the general text, plain (no chat template), packed on their own
    assert torch.equal(general_only, _packed(tok, _general_ids(tok, 8), 2, L))
    text = tok.decode(general_only.flatten())
    assert text.lstrip(tok.bos_token or "").startswith(general_train_texts("gsm8k", 1, 0)[0][:40])
    assert "<|im_start|>user" not in text
    # llm-compressor gets the same windows
    ds = calibration_dataset(tok, task, N, L, 0, "gptq", 0.25)
    assert ds["input_ids"] == mixed.tolist()
    facts = calibration_facts(task, N, 0.25)
    assert facts["source"] == "gsm8k train split + 25% general text (truthfulqa, humaneval, commonsenseqa train)"
    assert (facts["general_share"], facts["general_samples"]) == (0.25, 2)
    assert calibration_facts(task, N, 0.0) == {"source": "gsm8k train split", "general_share": 0.0,
                                               "general_samples": 0}


# --- training examples ------------------------------------------------------------------------------------------------

def test_training_examples_with_general_share(tok, task):
    from acf.models.tokenization import encode_prompt

    seq = 64
    assert training_examples(tok, task, N, seq, 0, general=0.0) == training_examples(tok, task, N, seq, 0)
    mixed = training_examples(tok, task, N, seq, 0, "kd_tune", general=0.25)
    task_only = training_examples(tok, task, 6, seq, 0)
    where = mix_order(6, 2)
    assert len(mixed) == N
    assert [e for e, g in zip(mixed, where) if not g] == task_only
    eos = tok(tok.eos_token, add_special_tokens=False)["input_ids"]
    want = [(encode_prompt(tok, t) + eos)[:seq] for t in general_train_texts("gsm8k", 2, 0)]
    gen = [e for e, g in zip(mixed, where) if g]
    assert [e.input_ids for e in gen] == want and all(e.labels == e.input_ids for e in gen)   # whole text target


# --- cache keys -------------------------------------------------------------------------------------------------------

def test_sensitivity_keys_change_with_the_mix_and_not_without_it():
    from acf.methods.gguf_mixed import GGUF_SENSITIVITY_VERSION, gguf_sensitivity_key, imatrix_key
    from acf.methods.mixed import SENSITIVITY_VERSION
    from acf.methods.sensitivity_cache import sensitivity_key

    args = ("digest", "gsm8k", 16, 512, 0, ["w4g32", "w8"], ["lm_head"])
    legacy = hashlib.sha256(json.dumps([SENSITIVITY_VERSION, "digest", "gsm8k", 16, 512, 0, ["w4g32", "w8"],
                                        ["lm_head"]]).encode()).hexdigest()[:24]
    assert sensitivity_key(*args) == sensitivity_key(*args, 0) == legacy
    assert len({legacy, sensitivity_key(*args, 4), sensitivity_key(*args, 8)}) == 3
    gargs = ("digest", "gsm8k", 16, 512, 0, ["Q4_K", "Q8_0"])
    imx = {"calib_samples": 8, "seq_len": 256}
    glegacy = hashlib.sha256(json.dumps([GGUF_SENSITIVITY_VERSION, "digest", "gsm8k", 16, 512, 0, ["Q4_K", "Q8_0"],
                                         [8, 256]]).encode()).hexdigest()[:24]
    assert imatrix_key(imx, 0.0) == (8, 256) and imatrix_key(imx, 0.25) == (8, 256, 2)
    assert gguf_sensitivity_key(*gargs, imatrix_key(imx, 0.0)) == glegacy
    assert gguf_sensitivity_key(*gargs, imatrix_key(imx, 0.25)) != glegacy          # the imatrix saw general text
    assert gguf_sensitivity_key(*gargs, imatrix_key(imx, 0.0), 4) != glegacy        # so did the Fisher pass


# --- wiring: steps read ctx.calib_mix -------------------------------------------------------------------------------

def test_gptq_and_its_fisher_pass_use_the_mix(tiny_model_dir, task, tmp_path, monkeypatch):
    from acf.methods.mixed import KEEP
    from acf.methods.run_steps import run_strategy
    from acf.methods.sensitivity_cache import sensitivity_key, weights_digest
    from acf.methods.strategy import validate_strategy

    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    formats = ["w3g32", "w4g32", "w8", KEEP]
    ctx = StepContext(device="cpu", task=task, calib_mix=0.25)
    strat = validate_strategy({"steps": [{"method": "gptq", "params": {
        "avg_bits": 5.0, "formats": formats, "sensitivity_samples": 4, "sensitivity_seq_len": L,
        "calib_samples": 4, "seq_len": L, "target": "transformers"}}]})
    rec = run_strategy(strat, tiny_model_dir, tmp_path / "out", ctx)[-1]
    assert rec.status == "ok", rec.reason
    cal = rec.extra["calibration"]
    assert (cal["general_share"], cal["general_samples"]) == (0.25, 1) and "25% general text" in cal["source"]
    sens = rec.extra["mixed_precision"]["sensitivity"]
    digest = weights_digest(tiny_model_dir)
    assert sens["key"] == sensitivity_key(digest, "gsm8k", 4, L, 0, formats, ["lm_head"], 1)
    assert sens["key"] != sensitivity_key(digest, "gsm8k", 4, L, 0, formats, ["lm_head"])
    assert sens["general_samples"] == 1 and "(evaluation's prompt format) + 25% general text" in sens["source"]


def test_kd_tune_and_drop_layers_use_the_mix(tiny_model_dir, task, tmp_path):
    from acf.methods.run_steps import run_strategy
    from acf.methods.strategy import validate_strategy

    ctx = StepContext(device="cpu", task=task, teacher_dir=tiny_model_dir, calib_mix=0.5)
    kd = {"steps": 2, "samples": 8, "seq_len": 32, "batch_size": 2}
    strat = validate_strategy({"steps": [{"method": "rtn", "params": {"bits": 4, "group_size": 32}},
                                         {"method": "kd_tune", "params": kd}]})
    rec = run_strategy(strat, tiny_model_dir, tmp_path / "kd", ctx)[-1]
    assert rec.status == "ok", rec.reason
    assert rec.extra["train_examples"] == 8 and rec.extra["train_text"]["general_samples"] == 4
    drop = validate_strategy({"steps": [{"method": "drop_layers", "params": {
        "count": 1, "by": "importance", "calib_samples": 4, "seq_len": L}}]})
    rec = run_strategy(drop, tiny_model_dir, tmp_path / "drop", dataclasses.replace(ctx, calib_mix=0.25))[-1]
    assert rec.status == "ok", rec.reason
    assert rec.extra["calibration"]["general_samples"] == 1



def test_gguf_imatrix_and_its_sensitivity_pass_use_the_mix(tiny_model_dir, task, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from acf.methods.gguf_mixed import gguf_sensitivity_key
    from acf.methods.run_steps import run_strategy
    from acf.methods.sensitivity_cache import weights_digest
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec

    monkeypatch.setenv("ACF_CACHE", str(tmp_path / "cache"))
    types = ["Q4_0", "Q8_0", "F16"]
    strat = validate_strategy({"steps": [{"method": "gguf", "params": {
        "imatrix": True, "calib_samples": 4, "seq_len": L, "avg_bits": 6.0, "types": types,
        "sensitivity_samples": 4, "sensitivity_seq_len": L}}]}, infer_spec(tiny_model_dir))
    rec = run_strategy(strat, tiny_model_dir, tmp_path / "gguf", StepContext(task=task, calib_mix=0.25))[-1]
    assert rec.status == "ok", rec.reason
    imx = rec.extra["imatrix"]
    assert imx["general_samples"] == 1 and "25% general text" in imx["source"]
    sens = rec.extra["mixed_precision"]["sensitivity"]
    digest = weights_digest(tiny_model_dir)
    assert sens["key"] == gguf_sensitivity_key(digest, "gsm8k", 4, L, 0, types, (4, L, 1), 1)
    assert sens["key"] != gguf_sensitivity_key(digest, "gsm8k", 4, L, 0, types, (4, L))
