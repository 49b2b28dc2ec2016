"""kd_tune: distillation after weight-only quantization into the tensors kept in 16 bits, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acf.core.errors import MethodFailed, StrategyError
from acf.methods.base import StepContext
from acf.methods.runner import run_strategy
from acf.methods.strategy import validate_strategy

RTN2 = {"method": "rtn", "params": {"bits": 2, "group_size": 16}}   # coarse enough to damage a random model
KD = {"steps": 25, "samples": 16, "seq_len": 64, "batch_size": 4, "lr": 1e-2}


@pytest.fixture(scope="module")
def ctx(tiny_model_dir, data_root):
    from acf.tasks import get_task

    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _kl_to_teacher(student_dir: Path, teacher_dir: Path) -> float:
    """KL(teacher || model loaded from disk by plain transformers) on fixed token sequences."""
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    ids = torch.randint(100, 5000, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, lq = torch.log_softmax(t(input_ids=ids).logits, -1), torch.log_softmax(s(input_ids=ids).logits, -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def quantized_and_tuned(tiny_model_dir, ctx, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd")
    q, t, te = tmp / "q", tmp / "t", tmp / "te"
    for out, steps in ((q, [RTN2]), (t, [RTN2, {"method": "kd_tune", "params": KD}]),
                       (te, [RTN2, {"method": "kd_tune", "params": {**KD, "embedding_lr": 1e-3}}])):
        recs = run_strategy(validate_strategy({"steps": steps}), tiny_model_dir, out, ctx)
        assert recs[-1].status == "ok", recs[-1].reason
    return q, t, te, recs


def test_only_the_16bit_tensors_change_and_the_size_stays(quantized_and_tuned):
    q, t, te, recs = quantized_and_tuned
    a, b, c = _tensors(q), _tensors(t), _tensors(te)
    assert set(a) == set(b) == set(c)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # the default trains the norms only: every quantized tensor (packed weights, scales, zero points) is untouched
    assert changed and all(k.endswith("norm.weight") for k in changed)
    assert all(b[k].dtype == a[k].dtype for k in a)
    changed_e = {k for k in a if not torch.equal(a[k], c[k])}
    assert changed_e == changed | {"model.embed_tokens.weight"}
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(t) - size(q)) < 1024
    ex = recs[-1].extra
    assert ex["trained_params"] > 0 and ex["frozen_quantized_modules"] == 14 and "reference" in ex["loss"]


def test_tuned_checkpoint_loads_with_plain_transformers_and_is_closer_to_the_teacher(quantized_and_tuned,
                                                                                  tiny_model_dir):
    import json

    q, t, te, _ = quantized_and_tuned
    cfg = json.loads((t / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    before, after = _kl_to_teacher(q, tiny_model_dir), _kl_to_teacher(t, tiny_model_dir)
    assert before > 0 and after < before, (before, after)


def test_dense_student_reproduces_the_compressed_model(quantized_and_tuned):
    from acf.methods.kd_tune import dense_student
    from acf.models.loading import load_model

    q = quantized_and_tuned[0]
    m, _ = load_model(q, "cpu")
    st, quantized = dense_student(q, "cpu", torch.float32, False)
    ids = torch.randint(100, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, st(input_ids=ids).logits)
    assert len(quantized) == 14


def test_refused_where_it_cannot_keep_the_checkpoint_exact(tiny_model_dir, ctx, tmp_path):
    from acf.methods.kd_tune import kd_tune
    from acf.methods.params import KDTuneParams

    for steps in ([{"method": "kd_tune"}], [{"method": "w8a8"}, {"method": "kd_tune"}],
                  [{"method": "bnb_nf4"}, {"method": "kd_tune"}], [{"method": "kd_tune"}, {"method": "rtn"}]):
        with pytest.raises(StrategyError, match="the step before must be one of gptq, awq, rtn, autoround"):
            validate_strategy({"steps": steps})
    # called on an unquantized checkpoint directly (no validation in between): a typed failure, nothing written
    with pytest.raises(MethodFailed, match="not a quantized compressed-tensors checkpoint"):
        kd_tune(KDTuneParams().model_dump(), tiny_model_dir, tmp_path, ctx)
    assert not list(tmp_path.iterdir())


def test_search_space_seeds_and_planner_mapping(tiny_model_dir, smol_dir):
    from acf.models.spec import infer_spec
    from acf.planner.space import params_for
    from acf.search.space import SearchSpace

    # the default model's shapes: the seeds' 4.25 bits is above its smallest vLLM-servable allocation (4.03), not
    # the tiny model's (5.03: headers and float32 scales of 64-wide layers), which gets no allocation seeds
    space = SearchSpace(infer_spec(smol_dir))
    seeds = space.seeds()
    gptq = [s for s in seeds if s.get("quant_only") == "gptq"]
    # the fixed recipes are the yardstick's, not seeds: acf's allocation + kd_tune comes first, then it alone
    assert [s.get("tune") for s in gptq] == ["kd_tune", "none"]
    assert gptq[0]["tune_steps"] == 100 and (gptq[0]["precision"], gptq[0]["budget"]) == ("budget", 4.25)
    ar = [s for s in seeds if s.get("quant_only") == "autoround"]
    assert [s.get("tune") for s in ar] == ["kd_tune", "none"] and ar[0]["budget"] == 4.25
    strat = validate_strategy({"steps": [{"method": "gptq", "params": {"avg_bits": 4.25, "act_order": True}},
                                         {"method": "kd_tune", "params": {"steps": 100}}]}, space.spec)
    p = params_for(space, strat)
    assert p is not None and p["tune"] == "kd_tune" and p["tune_steps"] == 100
    off = SearchSpace(infer_spec(tiny_model_dir), tune_methods=["none"])
    assert all("tune" not in s for s in off.seeds())
    assert params_for(off, strat) is None
