"""kd_tune: distillation after weight-only quantization into the tensors kept in 16 bits, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acf.core.errors import MethodFailed, StrategyError
from acf.methods.base import StepContext
from acf.methods.run_steps import run_strategy
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


# --- quantization scales (scale_lr > 0): codes frozen, scales trained, spliced by name ---------------------------

KDS = {"steps": 4, "samples": 8, "seq_len": 48, "batch_size": 4, "lr": 1e-2, "scale_lr": 1e-2}


@pytest.fixture(scope="module")
def tiny_bf16_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model stored in bf16, so its quantized scales are bf16 (the real models' case: the scale is rounded
    to the stored dtype at every step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_bf16") / "model"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(out)
    return out


# GPTQ symmetric per group with act-order (llm-compressor writes actorder "static", no g_idx) on the fp32 model;
# RTN asymmetric 3-bit per channel (packed zero points) on the bf16 model
SCALE_CASES = {
    "gptq_w4g16_actorder_fp32": ({"method": "gptq", "params": {"bits": 4, "group_size": 16, "act_order": True,
                                                               "calib_samples": 4, "seq_len": 32}}, False),
    "rtn_w3_channel_asym_bf16": ({"method": "rtn", "params": {"bits": 3, "group_size": None, "symmetric": False}},
                                 True),
}


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_scale_training_keeps_codes_and_reloads_to_the_students_logits(case, tiny_model_dir, tiny_bf16_dir,
                                                                        tmp_path):
    import json

    from acf.methods.kd_tune import splice_tensors, train_student
    from acf.methods.params import KDTuneParams
    from acf.models.loading import load_model
    from acf.tasks import get_task

    step, bf16 = SCALE_CASES[case]
    base = tiny_bf16_dir if bf16 else tiny_model_dir
    ctx = StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=base)
    q, t = tmp_path / "q", tmp_path / "t"
    recs = run_strategy(validate_strategy({"steps": [step]}), base, q, ctx)
    assert recs[-1].status == "ok", recs[-1].reason
    student, tensors, facts = train_student(KDTuneParams(**KDS).model_dump(), q, ctx)
    t.mkdir()
    splice_tensors(q, t, tensors)

    a, b = _tensors(q), _tensors(t)
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype for k in a)
    scale_keys = {k for k in a if k.endswith(".weight_scale")}
    assert len(scale_keys) == 14 and all(a[k].dtype == (torch.bfloat16 if bf16 else torch.float32) for k in scale_keys)
    # the integer codes, zero points and shapes are byte-identical; every scale tensor moved; nothing else changed
    frozen = [k for k in a if k.rsplit(".", 1)[-1] in ("weight_packed", "weight_zero_point", "weight_shape")]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert all(not torch.equal(a[k], b[k]) for k in scale_keys)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed - scale_keys and all(k.endswith("norm.weight") for k in changed - scale_keys)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(t) == size(q)
    assert json.loads((t / "config.json").read_text()) == json.loads((q / "config.json").read_text())
    assert facts["trained_scale_tensors"] == 14
    assert facts["trained_scale_entries"] == sum(a[k].numel() for k in scale_keys)
    assert 0 < facts["scale_entries_changed"] <= facts["trained_scale_entries"]
    assert facts["trained_params"] > 0 and "scale_parametrisation" in facts

    # the checkpoint as transformers' compressed-tensors path loads it reproduces the dense student
    m, _ = load_model(t, "cpu")
    ids = torch.randint(100, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = m(input_ids=ids).logits
        assert torch.allclose(student(input_ids=ids).logits, got, atol=2e-2 if bf16 else 0, rtol=0)
        # exactly, once the student's float32 norms are rounded as they were stored: the scales are exact
        for n, p in student.named_parameters():
            if n in b and n.endswith("norm.weight"):
                p.data = p.data.to(b[n].dtype).float()
        assert torch.equal(student(input_ids=ids).logits, got)


def test_kd_tune_step_trains_the_scales_and_records_them(tiny_model_dir, ctx, tmp_path):
    q, t = tmp_path / "q", tmp_path / "t"
    assert run_strategy(validate_strategy({"steps": [RTN2]}), tiny_model_dir, q, ctx)[-1].status == "ok"
    recs = run_strategy(validate_strategy({"steps": [RTN2, {"method": "kd_tune", "params": KDS}]}), tiny_model_dir,
                        t, ctx)
    assert recs[-1].status == "ok", recs[-1].reason
    a, b = _tensors(q), _tensors(t)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".weight_packed"))
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith(".weight_scale"))
    ex = recs[-1].extra
    assert ex["scale_lr"] == KDS["scale_lr"] and ex["trained_scale_tensors"] == 14
    assert ex["trained_scale_entries"] == sum(a[k].numel() for k in a if k.endswith(".weight_scale"))


def test_scale_lr_zero_leaves_the_scales_byte_identical(quantized_and_tuned):
    from acf.methods.params import KDTuneParams

    assert KDTuneParams().scale_lr == 0.0
    q, t, te, recs = quantized_and_tuned
    a, b = _tensors(q), _tensors(t)
    keys = [k for k in a if k.endswith(".weight_scale")]
    assert len(keys) == 14 and all(torch.equal(a[k], b[k]) for k in keys)
    assert recs[-1].extra["trained_scale_tensors"] == 0 and "scale_parametrisation" not in recs[-1].extra


def test_scale_gradient_matches_autograd_of_the_dequantized_weight():
    from compressed_tensors.quantization import QuantizationArgs

    from acf.methods.kd_tune import _Dequantize

    g = torch.Generator().manual_seed(0)
    for sym, strategy, gs in ((True, "group", 16), (False, "group", 16), (False, "channel", None)):
        args = QuantizationArgs(num_bits=4, symmetric=sym, strategy=strategy, group_size=gs)
        groups = 64 // gs if gs else 1
        codes = torch.randint(-8, 8, (8, 64), dtype=torch.int8, generator=g)
        zp = None if sym else torch.randint(-8, 8, (8, groups), dtype=torch.int8, generator=g)
        base = torch.rand(8, groups, generator=g) * 0.01 + 1e-3
        f = torch.nn.Parameter(1 + 0.01 * torch.randn(8, groups, generator=g))
        r = torch.randn(8, 64, generator=g)
        w = _Dequantize.apply(f, base, codes, zp, args, torch.float32, torch.float32)
        (w * r).sum().backward()
        f2 = f.detach().clone().requires_grad_()
        d = codes.float() - (0 if zp is None else zp.float().repeat_interleave(64 // groups, -1))
        w2 = d * (base * f2).repeat_interleave(64 // groups, -1)
        (w2 * r).sum().backward()
        assert torch.equal(w, w2.detach()) and torch.allclose(f.grad, f2.grad, rtol=1e-5, atol=1e-8)


def test_scale_training_refuses_layouts_it_cannot_keep_exact():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from acf.methods.kd_tune import scale_layout

    n = "model.layers.0.mlp.up_proj"
    stored = {f"{n}.{k}": None for k in ("weight_packed", "weight_scale", "weight_shape")}

    def scheme(fmt="pack-quantized", **w):
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**{"num_bits": 4, **w}), format=fmt)

    scale_layout(n, scheme(strategy="group", group_size=16), None, stored)                      # supported
    scale_layout(n, scheme(fmt=None, strategy="channel", actorder="weight"), "pack-quantized", stored)
    for sch, extra, match in (
            (scheme(strategy="tensor"), {}, "'tensor' strategy"),
            (scheme(strategy="group", group_size=16), {f"{n}.weight_g_idx": None}, "group act-order"),
            (scheme(strategy="group", group_size=16), {f"{n}.weight_global_scale": None}, "global_scale"),
            (scheme(fmt="naive-quantized", strategy="channel"), {}, "only 'pack-quantized'"),
            (scheme(strategy="group", group_size=16, symmetric=False), {}, "lacks weight_zero_point"),
            (scheme(strategy="group", group_size=16, dynamic=True), {}, "dynamic")):
        with pytest.raises(MethodFailed, match=match):
            scale_layout(n, sch, None, {**stored, **extra})
