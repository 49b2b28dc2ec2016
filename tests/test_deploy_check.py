"""vLLM conformance by rules (acf.methods.deploy_check): hand-made checkpoints that break one rule each, named by
layer and rule, and real outputs (uniform RTN/GPTQ W4 g64, a mixed allocation under target vllm) that pass.
Nothing here loads vLLM: the rules come from its source (acf.methods.vllm_rules)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest
import torch

from acf.methods.deploy_check import Violation, check_vllm, verdict
from acf.methods.mixed import KEEP, parse_format

# --- hand-made checkpoints ------------------------------------------------------------------------------------------

LAYOUT = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
          "self_attn.o_proj": (128, 128), "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128),
          "mlp.down_proj": (128, 256)}


def _weights(fmt: str, actorder: Optional[str] = None) -> dict:
    w = {**parse_format(fmt).weights_args(), "dynamic": False, "actorder": actorder}
    return w


def _write(d: Path, formats: dict[str, str], *, ignore_extra: tuple[str, ...] = (), actorder: Optional[str] = None,
           packed_override: Optional[dict[str, tuple[int, int]]] = None, model_type: str = "llama") -> Path:
    """A compressed-tensors checkpoint as llm-compressor writes it: one config group per format (exact names),
    kept layers in `ignore`, packed int32 values, scales and the int64 shape pair per quantized layer."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.zeros(32, 128),
                                        "lm_head.weight": torch.zeros(32, 128)}
    groups: dict[str, dict] = {}
    ignore = ["lm_head", *ignore_extra]
    for name, f in formats.items():
        out, inn = next(v for k, v in LAYOUT.items() if name.endswith(k)) if not name.split(".")[-1].startswith(
            ("w1", "w2", "w3")) else (64, 128)
        fmt = parse_format(f)
        if fmt.keep:
            tensors[name + ".weight"] = torch.zeros(out, inn)
            if name not in ignore:
                ignore.append(name)
            continue
        packed = (packed_override or {}).get(name, (out, math.ceil(inn * fmt.bits / 32)))
        tensors[name + ".weight_packed"] = torch.zeros(packed, dtype=torch.int32)
        tensors[name + ".weight_scale"] = torch.zeros(out, inn // fmt.group if fmt.group else 1)
        tensors[name + ".weight_shape"] = torch.tensor([out, inn], dtype=torch.int64)
        g = groups.setdefault(f, {"targets": [], "weights": _weights(f, actorder), "format": "pack-quantized",
                                  "input_activations": None})
        g["targets"].append(name)
    save_file(tensors, str(d / "model.safetensors"))
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ignore,
          "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}}
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "quantization_config": qc}))
    return d


def _block(fmt: str, blocks: int = 2, **over: str) -> dict[str, str]:
    return {f"model.layers.{b}.{k}": over.get(f"{b}.{k}", fmt) for b in range(blocks) for k in LAYOUT}


def test_a_uniform_servable_checkpoint_conforms(tmp_path):
    for fmt in ("w4g32", "w4g64", "w4g128", "w4", "w8"):
        assert check_vllm(_write(tmp_path / fmt, _block(fmt))) == [], fmt
    v = verdict([])
    assert v["conforms"] and "not loaded" in v["checked"] and "vLLM 0.34.0" in v["checked"]


def test_a_split_fused_layer_is_refused_by_name(tmp_path):
    found = check_vllm(_write(tmp_path / "m", _block("w4g32", **{"0.self_attn.k_proj": "w8"})))
    assert found == [Violation("model.layers.0.self_attn.qkv_proj", "fused-scheme", found[0].detail)]
    assert "q_proj=w4g32, k_proj=w8, v_proj=w4g32" in found[0].detail
    # gate kept in 16 bits, up quantized: the ignore list covers one shard of gate_up_proj
    found = check_vllm(_write(tmp_path / "i", _block("w4g32", **{"1.mlp.gate_proj": KEEP})))
    assert [(v.layer, v.rule) for v in found] == [("model.layers.1.mlp.gate_up_proj", "fused-ignore")]
    assert "gate_proj" in found[0].detail
    # the same split in a family whose gate/up vLLM does not fuse under those names (phi3: already one Linear)
    assert check_vllm(_write(tmp_path / "p", _block("w4g32", **{"1.mlp.gate_proj": "w8"}), model_type="phi3")) == []


def test_formats_vllm_kernels_do_not_serve_are_refused_by_name(tmp_path):
    found = check_vllm(_write(tmp_path / "g16", _block("w4g64", **{"1.self_attn.o_proj": "w4g16"})))
    assert [(v.layer, v.rule) for v in found] == [("model.layers.1.self_attn.o_proj", "kernel")]
    assert "group size 16" in found[0].detail
    found = check_vllm(_write(tmp_path / "w3", _block("w4g64", **{"0.mlp.down_proj": "w3g64"})))
    assert [(v.layer, v.rule) for v in found] == [("model.layers.0.mlp.down_proj", "kernel")]
    assert "3-bit" in found[0].detail
    # 256 at 4 bits: TritonW4A16 (output % 8); not at 8 bits
    assert check_vllm(_write(tmp_path / "g256", {"model.layers.0.mlp.down_proj": "w4g256"})) == []
    found = check_vllm(_write(tmp_path / "w8g256", {"model.layers.0.mlp.down_proj": "w8g256"}))
    assert [v.rule for v in found] == ["kernel"]


def test_config_and_tensor_rules(tmp_path):
    found = check_vllm(_write(tmp_path / "ao", _block("w4g64", 1), actorder="group"))
    assert {v.rule for v in found} == {"scheme"} and all("actorder 'group'" in v.detail for v in found)
    assert check_vllm(_write(tmp_path / "st", _block("w4g64", 1), actorder="static")) == []
    found = check_vllm(_write(tmp_path / "sh", _block("w4g64", 1),
                              packed_override={"model.layers.0.self_attn.o_proj": (128, 8)}))
    assert [(v.layer, v.rule) for v in found] == [("model.layers.0.self_attn.o_proj", "tensors")]
    # routed experts of one MoE layer: one scheme for all
    moe = {f"model.layers.0.block_sparse_moe.experts.{e}.{p}": ("w8" if (e, p) == (1, "w3") else "w4g64")
           for e in range(2) for p in ("w1", "w2", "w3")}
    found = check_vllm(_write(tmp_path / "moe", moe, model_type="mixtral"))
    assert [(v.layer, v.rule) for v in found] == [("model.layers.0.block_sparse_moe.experts", "fused-scheme")]
    # a dense model: nothing quantized, nothing to check
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert check_vllm(tmp_path / "dense") == []


def test_a_step_records_the_verdict_and_fails_only_under_target_vllm(tmp_path):
    """Under target vllm a violation is acf's own error (the allocator promised a servable model): the step fails;
    under transformers the verdict is recorded and the step stands."""
    from acf.core.errors import MethodFailed
    from acf.methods.mixed_step import record_deploy_check

    bad = _write(tmp_path / "m", _block("w4g32", **{"0.self_attn.k_proj": "w8"}))
    facts: dict = {"target": "transformers"}
    record_deploy_check(facts, bad, "rtn")
    assert facts["deploy_check"]["conforms"] is False
    assert facts["deploy_check"]["violations"][0].startswith("model.layers.0.self_attn.qkv_proj: fused-scheme:")
    with pytest.raises(MethodFailed, match="breaks 1 vLLM loader rule"):
        record_deploy_check({"target": "vllm"}, bad, "rtn")


# --- real outputs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctx(data_root, tiny_model_dir):
    from acf.methods.base import StepContext
    from acf.tasks import get_task

    return StepContext(device="cpu", task=get_task("gsm8k"), teacher_dir=tiny_model_dir)


def _run(method: str, params: dict, src: Path, out: Path, ctx):
    from acf.methods import run_strategy
    from acf.methods.strategy import validate_strategy
    from acf.models.spec import infer_spec

    strat = validate_strategy({"steps": [{"method": method, "params": params}]}, infer_spec(src))
    recs = run_strategy(strat, src, out, ctx)
    assert recs[-1].status == "ok", recs[-1].reason
    return recs[-1]


@pytest.mark.parametrize("method,extra", [("rtn", {}), ("gptq", {"calib_samples": 4, "seq_len": 64})])
def test_uniform_w4_g64_outputs_conform(method, extra, tiny_model_dir, tmp_path, ctx):
    _run(method, {"bits": 4, "group_size": 64, **extra}, tiny_model_dir, tmp_path / "out", ctx)
    assert check_vllm(tmp_path / "out") == []


def _cli(capsys, *args) -> tuple[int, str]:
    from cli_run import run_cli

    code, out, _ = run_cli(capsys, *args)
    return code, out


def test_mixed_outputs_record_the_verdict_and_the_cli_prints_it(tiny_model_dir, tmp_path, ctx, capsys):
    """An allocation under target vllm conforms (recorded in the step's facts, and `acf check-deploy` exits 0); one
    that splits q/k/v under target transformers still writes a model transformers loads, and the check names the
    fused layer (exit 2, one line per violation)."""
    rec = _run("rtn", {"avg_bits": 6.0, "sensitivity_samples": 4, "sensitivity_seq_len": 32}, tiny_model_dir,
               tmp_path / "vllm", ctx)
    facts = rec.extra["mixed_precision"]
    assert facts["target"] == "vllm"
    assert facts["deploy_check"]["conforms"] and facts["deploy_check"]["violations"] == []
    assert facts["deploy_check"]["checked"].startswith("by rules against vLLM 0.34.0")
    lf = facts["allocation"]["layer_formats"]
    assert len(set(lf.values())) >= 2
    from acf.methods.vllm_rules import fused_groups

    assert all(len({lf[m] for m in ms}) == 1 for ms in fused_groups(lf).values())
    code, out = _cli(capsys, "check-deploy", str(tmp_path / "vllm"))
    assert code == 0 and out.startswith("conforms (by rules; not loaded)")

    split = {n: "w8" if n.endswith("k_proj") else "w4g32" for n in lf}
    rec = _run("rtn", {"layer_formats": split, "target": "transformers"}, tiny_model_dir, tmp_path / "tf", ctx)
    dc = rec.extra["mixed_precision"]["deploy_check"]
    assert not dc["conforms"] and len(dc["violations"]) == 2    # one qkv_proj per block
    code, out = _cli(capsys, "check-deploy", str(tmp_path / "tf"))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert lines[0].startswith("model.layers.0.self_attn.qkv_proj: fused-scheme:")
