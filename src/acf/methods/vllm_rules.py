"""What vLLM's compressed-tensors loader accepts for weight-only integer layers, as rules acf applies without vLLM.

Why rules and not a load: vLLM is a GPU server with its own torch pin; acf neither depends on it nor can load it in
CPU tests. So the allocator (acf.methods.mixed, target "vllm") and the conformance check (acf.methods.deploy_check)
apply the rules below, read from vLLM's source. An output that passes is "checked by rules", never "loads".

Read from vLLM 0.34.0 (wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64, `vllm/_version.py` commit g62d4bc3c7);
paths below are inside that package:

- Fused layers: vLLM stacks some checkpoint Linears into one layer (`packed_modules_mapping` of the model classes,
  e.g. `model_executor/models/llama.py` LlamaForCausalLM: qkv_proj <- q_proj, k_proj, v_proj; gate_up_proj <-
  gate_proj, up_proj; the same in qwen2.py, qwen3.py, gemma2.py, gemma3.py, granite.py, and the Transformers
  backend fuses q/k/v and GLU gate/up the same way: `models/transformers/fusers/qkv.py`, `glu.py`). One fused layer
  gets one scheme: `layers/quantization/compressed_tensors/utils.py` `_match_fused_layer` returns the first shard's
  target for the whole layer, and `should_ignore_layer` raises "Found different quantization schemes for the
  shards of ..." when the ignore list covers some shards but not all.
- MoE experts: `compressed_tensors_moe/compressed_tensors_moe.py` `get_moe_method` raises "All MoE projections need
  to have same quantization scheme" when expert 0's gate/up/down differ, and builds one method for all experts.
- Scheme: weight-only int with strategy group or channel, static, format pack-quantized -> CompressedTensorsWNA16
  (`compressed_tensors/compressed_tensors.py` `_is_wNa16_group_channel`, `_get_scheme_from_parts`); actorder
  "group"/"dynamic" is refused at config parse (`_quantization_scheme_map_from_config`).
- Kernels (`model_executor/kernels/linear/__init__.py` `_POSSIBLE_KERNELS[CUDA]`: CutlassW4A8, Machete, Marlin,
  Conch, Exllama, TritonW4A16, Humming, first that `can_implement` wins), for 16-bit activations:
  Marlin (`kernels/linear/mixed_precision/marlin.py`, compute capability >= 7.5): types uint4b8/uint8b128
  (symmetric 4/8 bits) and uint4 with zero points (`layers/quantization/utils/marlin_utils.py`
  `query_marlin_supported_quant_types`), group sizes -1 (channel), 32, 64, 128 (`MARLIN_SUPPORTED_GROUP_SIZES`),
  the group must divide the input size, other tile misalignment is zero-padded. Machete (Hopper only) takes a
  subset (-1, 64, 128; K % 64, N % 128) and falls through to Marlin otherwise. TritonW4A16
  (`triton_w4a16.py`): 4 bits only, groups -1, 32, 64, 128, 256, output size % 8, input size % group. Exllama
  needs float16 activations; Conch and Humming are separate packages (`conch-triton-kernels`, `humming-kernels`)
  whose own limits are not in vLLM's source, so acf does not count on them: 2/3/5/6/7-bit formats, which only
  they could serve, are refused. Earlier vLLMs (e.g. commit 02637af of `schemes/compressed_tensors_wNa16.py`) took
  only 4 and 8 bits and required output % 64 and input % 128 per partition (`verify_marlin_supports_shape`);
  0.34.0 pads instead.

Assumed: tensor parallel size 1 (a larger one splits K of row-parallel layers, and Marlin refuses a group that
straddles ranks), CUDA, 16-bit activations.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Sequence

#: the vLLM whose source the rules were read from (recorded with every verdict)
VLLM_READ = "vLLM 0.34.0 (commit 62d4bc3c7)"

#: q/k/v and gate/up: vLLM's packed_modules_mapping of Llama-like models (models/llama.py LlamaForCausalLM)
LLAMA_LIKE: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                          "gate_up_proj": ("gate_proj", "up_proj")}

#: fused layers by HF `model_type` where they differ from LLAMA_LIKE (vLLM 0.34.0 model classes):
#: exaone.py ExaoneForCausalLM (gate_up_proj <- c_fc_0, c_fc_1); internlm2.py InternLM2ForCausalLM (gate_up_proj
#: <- w1, w3; wqkv is one Linear in the checkpoint already); phi3.py Phi3ForCausalLM (qkv_proj and gate_up_proj
#: are single Linears in the checkpoint: nothing to split). MoE families keep LLAMA_LIKE: mixtral.py, qwen2_moe.py
#: and qwen3_moe.py list only qkv_proj in packed_modules_mapping, but their shared or dense MLPs are
#: MergedColumnParallelLinear gate_up_proj layers (e.g. qwen2_moe.py Qwen2MoeMLP), which also take one scheme.
FUSED_BY_FAMILY: dict[str, dict[str, tuple[str, ...]]] = {
    "exaone": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("c_fc_0", "c_fc_1")},
    "internlm2": {"gate_up_proj": ("w1", "w3")},
    "phi3": {},
}

#: routed experts of one MoE layer ("<prefix>.experts.<i>.<proj>"): one scheme for all (get_moe_method)
_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.\d+\.[^.]+$")

#: bits and group sizes (None: per output channel) served by vLLM's own kernels for symmetric int weights
WNA16_BITS = (4, 8)
MARLIN_GROUPS = (None, 32, 64, 128)
#: TritonW4A16 adds group 256 at 4 bits (output size % 8)
TRITON_W4_GROUPS = (None, 32, 64, 128, 256)


def fused_mapping(family: Optional[str]) -> dict[str, tuple[str, ...]]:
    """vLLM's fused layers for a model family (HF `model_type`); Llama-like names by default."""
    return FUSED_BY_FAMILY.get(family or "", LLAMA_LIKE)


def fused_key(name: str, family: Optional[str] = None) -> str:
    """The vLLM layer a checkpoint Linear ends up in: 'model.layers.0.self_attn.qkv_proj' for '...q_proj', the
    experts module for a routed expert's projection, the name itself otherwise."""
    m = _EXPERT.match(name)
    if m:
        return m.group("layer")
    parent, _, leaf = name.rpartition(".")
    for fused, members in fused_mapping(family).items():
        if leaf in members and len(members) > 1:
            return f"{parent}.{fused}" if parent else fused
    return name


def fused_groups(names: Iterable[str], family: Optional[str] = None) -> dict[str, list[str]]:
    """Checkpoint Linear names grouped by the vLLM layer they load into, in first-seen order of the groups, the
    shards of a fused layer in vLLM's order (q, k, v; gate, up); a layer that is not fused is a group of one."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(fused_key(n, family), []).append(n)
    order = {leaf: i for members in fused_mapping(family).values() for i, leaf in enumerate(members)}
    for key, members in out.items():
        if not _EXPERT.match(members[0]):   # experts keep their checkpoint order
            members.sort(key=lambda n: order.get(n.rpartition(".")[2], len(order)))
    return out


def wna16_problem(bits: int, group: Optional[int], in_features: int, out_features: int,
                  symmetric: bool = True) -> Optional[str]:
    """Why vLLM's own WNA16 kernels cannot run this format on a (fused) layer of this shape (input K, summed output
    N), or None when Marlin (or TritonW4A16 for 4-bit group 256) can. See the module docstring for the sources."""
    if not symmetric and bits != 4:
        return f"asymmetric {bits}-bit weights: Marlin takes zero points only at 4 bits (uint4)"
    if bits not in WNA16_BITS:
        return f"{bits}-bit weights: vLLM's kernels take 4 or 8 bits (Marlin uint4b8/uint8b128)"
    if group is not None and in_features % group:
        return f"group {group} does not divide the input size {in_features}"
    if group in MARLIN_GROUPS:
        return None
    if bits == 4 and group in TRITON_W4_GROUPS:
        if out_features % 8:
            return f"group {group}: TritonW4A16 needs the output size % 8 == 0 (got {out_features})"
        return None
    return (f"group size {group}: Marlin takes {', '.join('channel' if g is None else str(g) for g in MARLIN_GROUPS)}"
            f" (and 256 at 4 bits through TritonW4A16)")


def format_problem(bits: int, group: Optional[int]) -> Optional[str]:
    """Why no layer shape makes this format servable by vLLM's own kernels (the bits and group size alone), or
    None when some shapes can take it."""
    return wna16_problem(bits, group, group or 1, 8)


def group_problems(members: Sequence[str], formats: Mapping[str, str]) -> Optional[str]:
    """Why one fused layer's members cannot load as allocated (they differ in format), or None."""
    got = {formats[m] for m in members if m in formats}
    if len(got) > 1:
        return "shards in different formats (" + ", ".join(f"{m.rsplit('.', 1)[-1]}={formats[m]}"
                                                          for m in members if m in formats) + ")"
    return None
