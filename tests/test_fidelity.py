"""Fidelity to the uncompressed model (kld, top1, kld_general) on tiny real models, and the baseline reference cache."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from acf.evaluation.fidelity import (ReferenceError, build_reference, cached_reference, load_reference,
                                     save_reference, teacher_forced)
from acf.evaluation.runner import Loaded, build_fidelity, eval_items, evaluate
from acf.evaluation.sequences import task_sequences
from acf.tasks import get_task


@pytest.fixture(scope="module")
def gsm8k(data_root):
    return get_task("gsm8k")


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    ld = Loaded.load(tiny_model_dir, "cpu")
    yield ld
    ld.free()


def _perturbed(model, scale: float = 0.05, seed: int = 1):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return m


def test_model_against_itself_is_zero_kld_and_full_agreement(base, gsm8k, tiny_model_dir):
    items = eval_items(gsm8k, 6, 0)
    fid = build_fidelity(base.model, base.tokenizer, gsm8k, items)
    res = evaluate(tiny_model_dir, gsm8k, ["kld", "top1", "kld_general"], limit=6, loaded=base, fidelity=fid,
                   show_progress=False)
    assert abs(res.metrics["kld"].value) <= 1e-6 and res.metrics["top1"].value == 1.0
    assert abs(res.metrics["kld_general"].value) <= 1e-6
    assert res.metrics["kld"].n == 6 and res.metrics["kld"].extra["tokens"] > 0
    assert res.metrics["kld_general"].extra["sources"] and "gsm8k" not in res.metrics["kld_general"].extra["sources"]


def test_kld_equals_a_direct_torch_computation(base, gsm8k):
    tok = base.tokenizer
    seqs = task_sequences(gsm8k, tok, eval_items(gsm8k, 3, 0))
    other = _perturbed(base.model, scale=0.5)
    vocab = base.model.config.vocab_size
    exact_ref = build_reference(base.model, tok, seqs, k=vocab)       # k = vocabulary: no tail, the exact KL
    got = teacher_forced(other, tok, seqs, ["kld", "top1"], reference=exact_ref)
    # direct: full distributions of both models, one sequence at a time, no padding
    kl_sum, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.prompt + s.target])
            p_len, r_len = len(s.prompt), len(s.target)
            lp = torch.log_softmax(base.model(ids).logits[0, p_len - 1:p_len + r_len - 1].float(), -1)
            lq = torch.log_softmax(other(ids).logits[0, p_len - 1:p_len + r_len - 1].float(), -1)
            kl_sum += float((lp.exp() * (lp - lq)).sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += r_len
    assert got["kld"].value == pytest.approx(kl_sum / n, rel=1e-4, abs=1e-7)
    assert got["top1"].value == pytest.approx(agree / n, abs=1e-9)
    assert got["kld"].value > 0
    # the top-k + tail reference is a lower bound of the exact KL (coarse-graining never increases a divergence)
    small = teacher_forced(other, tok, seqs, ["kld"], reference=build_reference(base.model, tok, seqs, k=8))
    assert 0 <= small["kld"].value <= got["kld"].value + 1e-6


def test_gptq_w4_tiny_model_has_positive_kld(base, gsm8k, tiny_model_dir, tmp_path):
    from acf.methods import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.methods.strategy import validate_strategy

    out = tmp_path / "gptq"
    strategy = validate_strategy({"steps": [{"method": "gptq", "params": {"bits": 4, "group_size": 32,
                                                                          "calib_samples": 4, "seq_len": 64}}]})
    recs = run_strategy(strategy, tiny_model_dir, out, StepContext(task=gsm8k))
    assert recs and recs[-1].status == "ok", recs[-1].reason
    fid = build_fidelity(base.model, base.tokenizer, gsm8k, eval_items(gsm8k, 4, 0), general=False)
    res = evaluate(out, gsm8k, ["kld", "top1", "params", "sparsity", "size"], limit=4, fidelity=fid,
                   show_progress=False)
    # a random-init model is near-uniform, so W4 moves it little; but measurably (the model against itself is 0)
    assert res.metrics["kld"].value > 1e-9 and res.metrics["top1"].value <= 1.0
    base_params = evaluate(tiny_model_dir, gsm8k, ["params"], loaded=base, show_progress=False).metrics["params"]
    assert res.metrics["params"].value == base_params.value   # scales / zero points are not parameters
    assert res.metrics["sparsity"].value is None               # a quantized grid's zeros are not sparsity


def test_fidelity_metrics_need_a_baseline(tiny_model_dir, gsm8k):
    from acf.core.errors import AcfError

    with pytest.raises(AcfError, match="baseline"):
        evaluate(tiny_model_dir, gsm8k, ["kld"], limit=2, show_progress=False)


def test_search_and_report_items_are_disjoint(gsm8k):
    search = eval_items(gsm8k, 100, 0)
    report = eval_items(gsm8k, 300, 0, offset=100)
    assert len(search) == 100 and len(report) == 300
    assert not {i.id for i in search} & {i.id for i in report}
    assert [i.id for i in eval_items(gsm8k, 24, 0)] == [i.id for i in search[:24]]   # proxy = prefix of search
    rest = eval_items(gsm8k, None, 0, offset=100)
    assert len(rest) == len(gsm8k.load("test")) - 100


def test_reference_cache_round_trip_and_corruption(base, gsm8k, tmp_path):
    seqs = task_sequences(gsm8k, base.tokenizer, eval_items(gsm8k, 3, 0))
    ref = build_reference(base.model, base.tokenizer, seqs, k=16)
    path = tmp_path / "ref" / "task-search.safetensors"
    save_reference(ref, path)
    back = load_reference(path)
    assert back.covers(seqs) and torch.equal(back.topk_idx, ref.topk_idx) and torch.equal(back.topk_logp, ref.topk_logp)
    calls = []

    def build():
        calls.append(1)
        return build_reference(base.model, base.tokenizer, seqs, k=16)

    said: list[str] = []
    assert cached_reference(path, seqs, build, say=said.append).covers(seqs) and not calls   # reused, not rebuilt
    # truncated tensor file: named, then recomputed — never read as zeros
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceError, match=str(path.name)):
        load_reference(path)
    again = cached_reference(path, seqs, build, say=said.append)
    assert calls == [1] and said and path.name in said[-1]
    assert torch.equal(again.topk_logp, ref.topk_logp) and load_reference(path).covers(seqs)
    # corrupt manifest
    man = path.with_name(path.name + ".json")
    man.write_text("{not json")
    with pytest.raises(ReferenceError, match="manifest"):
        load_reference(path)
    cached_reference(path, seqs, build, say=said.append)
    assert calls == [1, 1]
    # other sequences: rebuilt
    more = task_sequences(gsm8k, base.tokenizer, eval_items(gsm8k, 5, 0))
    cached_reference(path, more, lambda: build_reference(base.model, base.tokenizer, more, k=16), say=said.append)
    assert load_reference(path).covers(more)
