"""Weight quantization: llm-compressor recipes (gptq, awq, rtn, autoround, w8a8) and bitsandbytes (int8, nf4).

llm-compressor outputs are saved compressed (compressed-tensors, `save_compressed=True`): 4-bit weights are
packed into int32 with per-group scales, so the size on disk really shrinks, and transformers reloads them with
`from_pretrained` (compressed-tensors kernels, or dequantized with `CompressedTensorsConfig(run_compressed=False)`).

bitsandbytes outputs are saved with `save_pretrained` after loading with a `BitsAndBytesConfig`; checked here
(bitsandbytes 0.50, transformers 5.17) that both int8 and nf4 checkpoints written on CPU reload on CPU with
plain `from_pretrained(dir, device_map={"": "cpu"})` and give identical logits.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from acf.core.errors import MethodFailed
from acf.methods.base import StepContext
from acf.methods.calibration import calibration_dataset, calibration_facts
from acf.methods.memory import autoround_batch
from acf.methods.mixed import config_groups
from acf.methods.mixed_step import allocation_for, record_deploy_check, record_measured_size
from acf.methods.model_io import load_dense, quant_method, save_model, stored_dtype, versions
from acf.models.loading import free, load_tokenizer, torch_dtype_for

_LIBS = ("llmcompressor", "compressed-tensors", "transformers", "torch")


def _weight_args(bits: int, group_size: Optional[int], symmetric: bool, actorder: Any = "unset") -> dict:
    w: dict[str, Any] = {"num_bits": bits, "type": "int", "symmetric": symmetric}
    if group_size:
        w.update(strategy="group", group_size=group_size)
    else:
        w.update(strategy="channel")
    if actorder != "unset":
        w["actorder"] = actorder
    return w


def _config_groups(bits: int, group_size: Optional[int], symmetric: bool, actorder: Any = "unset") -> dict:
    # config_groups rather than a preset scheme name: presets fix the group size at 128, which is invalid for
    # hidden sizes such as SmolLM2's 576 (see shared/device/README.md).
    return {"group_0": {"targets": ["Linear"], "weights": _weight_args(bits, group_size, symmetric, actorder)}}


def autoround_groups(groups: dict, mixed: bool) -> dict:
    """The config groups AutoRoundModifier is given: for a per-layer allocation, its groups with the class target
    "Linear" added to the first. Why: llm-compressor 0.14's AutoRoundModifier matches its targets inside one decoder
    block, by names relative to it ("self_attn.q_proj"), so the allocation's exact model-level names match nothing
    there: AutoRound then gets no per-layer `layer_config` (every layer tuned in its default format, and a shape
    error when the llm-compressor scales of another format are put back) and no `ignore_layers` (the layers kept in
    16 bits would be rounded as well). With "Linear" every Linear of the block is a target; compressed-tensors ranks
    exact names before class names (`match_targets`), so each layer keeps its allocated format, and the layers kept
    (in `ignore`, so without a scheme) become AutoRound's ignore_layers. Pure: the input is not changed."""
    if not mixed or not groups:
        return groups
    out = {k: {**g, "targets": list(g["targets"])} for k, g in groups.items()}
    first = out[next(iter(out))]
    if "Linear" not in first["targets"]:
        first["targets"].append("Linear")
    return out


def _recipe(method: str, p: dict, mixed: Optional[tuple[dict, list[str]]] = None) -> list:
    """The llm-compressor modifiers of a step; `mixed` = (config_groups, layers kept) of a per-layer allocation
    replaces the uniform `bits`/`group_size` group."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = list(p.get("ignore") or [])
    groups = _config_groups(p.get("bits", 4), p.get("group_size"), p.get("symmetric", True))
    if mixed is not None:
        groups, kept = mixed
        ignore += [k for k in kept if k not in ignore]
    if method == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if method == "gptq":
        if p["act_order"]:
            # static (group) act-order where every group is grouped; "weight" order for per-channel formats
            grouped = all(g["weights"].get("group_size") for g in groups.values())
            actorder = "static" if grouped else "weight"
        else:
            actorder = None
        return [GPTQModifier(config_groups=groups, ignore=ignore, actorder=actorder,
                             dampening_frac=p["dampening_frac"])]
    if method == "awq":
        # llm-compressor 0.14: AWQ is a transform (smoothing scales) that must be followed by a quantization
        # modifier; mappings for Llama-family models are resolved from the architecture automatically.
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(
            config_groups=_config_groups(p["bits"], p["group_size"], p["symmetric"]), ignore=ignore)]
    if method == "w8a8":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=p["smoothing_strength"]),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if method == "autoround":
        try:
            from llmcompressor.modifiers.autoround import AutoRoundModifier
        except ImportError as e:  # a dependency of acf (pyproject.toml), missing only from a partial install
            raise MethodFailed("autoround", "unavailable",
                               f"llmcompressor's AutoRoundModifier needs the 'auto-round' package, a dependency of "
                               f"acf (pip install 'auto-round>=0.14.1,<=0.15.1'): {e}") from None
        # one config group per format (or the uniform group): AutoRoundModifier builds AutoRound's per-layer
        # `layer_config` from each module's own quantization scheme, so an allocation is tuned in its formats
        # (once its targets match inside a block: `autoround_groups`)
        return [AutoRoundModifier(config_groups=autoround_groups(groups, mixed is not None), ignore=ignore,
                                  iters=p["iters"],
                                  batch_size=autoround_batch(p),
                                  # torch.compile costs minutes of compile time per block on CPU for no gain here
                                  enable_torch_compile=False)]
    raise MethodFailed(method, "unavailable", f"not an llm-compressor quantization method: {method}")


@contextlib.contextmanager
def _cpu_pin_memory_guard(device: str) -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations before the grid search (`IntermediatesCache.pin_memory`)
    to speed up host->GPU copies; with no accelerator, `Tensor.pin_memory()` raises "Cannot access accelerator device
    when none is available" and AWQ cannot run on CPU at all. Pinning has no purpose without a GPU, so on CPU the
    call is made a no-op for the duration of the step only."""
    if device.startswith("cuda") or torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    orig = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = orig  # type: ignore[method-assign]


def llmcompressor_quantize(method: str, params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    """Run one llm-compressor `oneshot` recipe on the input model and save it compressed with its tokenizer."""
    from llmcompressor import oneshot

    model, tok = load_dense(in_dir, ctx.device, method, trust_remote_code=ctx.trust_remote_code)
    extra: dict[str, Any] = {"libraries": versions(*_LIBS, *(("auto-round",) if method == "autoround" else ()))}
    mixed = None
    if params.get("avg_bits") is not None or params.get("layer_formats"):
        alloc, facts = allocation_for(model, tok, params, in_dir, ctx, method)
        mixed = config_groups(alloc.layer_formats)
        extra["mixed_precision"] = facts
    recipe = _recipe(method, params, mixed)
    kw: dict[str, Any] = {}
    if method != "rtn":
        n, L = params["calib_samples"], params["seq_len"]
        kw.update(dataset=calibration_dataset(tok, ctx.task, n, L, ctx.seed, method, ctx.calib_mix),
                  num_calibration_samples=n, max_seq_length=L, shuffle_calibration_samples=False)
        extra["calibration"] = {"samples": n, "seq_len": L, "seed": ctx.seed,
                                **calibration_facts(ctx.task, n, ctx.calib_mix, method)}
    # On CUDA the model stays on the CPU: llm-compressor's sequential pipeline onloads one decoder block at a time.
    t = time.perf_counter()
    with _cpu_pin_memory_guard(ctx.device):
        oneshot(model=model, recipe=recipe, tokenizer=tok, **kw)
    extra["oneshot_seconds"] = round(time.perf_counter() - t, 3)
    save_model(model, tok, out_dir, dtype=stored_dtype(in_dir), save_compressed=True)
    free(model)
    if mixed is not None:
        record_measured_size(extra["mixed_precision"], out_dir)
        record_deploy_check(extra["mixed_precision"], out_dir, method)
    else:
        # a uniform output is checked too, as a fact and never a failure: a user's own recipe (W3) may be meant for
        # transformers; the report names the recipes vLLM would refuse
        from acf.methods.deploy_check import check_vllm, verdict

        extra["deploy_check"] = verdict(check_vllm(out_dir))
    return extra


def gptq(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return llmcompressor_quantize("gptq", params, in_dir, out_dir, ctx)


def awq(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return llmcompressor_quantize("awq", params, in_dir, out_dir, ctx)


def rtn(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return llmcompressor_quantize("rtn", params, in_dir, out_dir, ctx)


def autoround(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return llmcompressor_quantize("autoround", params, in_dir, out_dir, ctx)


def w8a8(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    return llmcompressor_quantize("w8a8", params, in_dir, out_dir, ctx)


# --- bitsandbytes --------------------------------------------------------------------------------------------------

def _bnb(method: str, cfg, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from transformers import AutoModelForCausalLM

    qm = quant_method(in_dir)
    if qm is not None:
        raise MethodFailed(method, "config", f"input {in_dir} is already quantized ({qm})")
    tok = load_tokenizer(in_dir, ctx.trust_remote_code)
    # Non-quantized parts (embeddings, norms, lm_head) keep the input's stored dtype: a bnb model cannot be cast
    # after loading, and upcasting would inflate its size on disk.
    model = AutoModelForCausalLM.from_pretrained(str(in_dir), quantization_config=cfg, device_map={"": ctx.device},
                                                 dtype=_bnb_dtype(in_dir, ctx.device),
                                                 trust_remote_code=ctx.trust_remote_code)
    save_model(model, tok, out_dir)
    n_q = sum(1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
    free(model)
    if n_q == 0:
        raise MethodFailed(method, "library", "bitsandbytes replaced no Linear layer")
    return {"quantized_linear_layers": n_q, "libraries": versions("bitsandbytes", "transformers", "torch")}


def _bnb_dtype(in_dir: Path, device: str) -> torch.dtype:
    return stored_dtype(in_dir) or torch_dtype_for(device)


def bnb_int8(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=params["threshold"],
                             llm_int8_skip_modules=["lm_head"])
    return _bnb("bnb_int8", cfg, in_dir, out_dir, ctx)


def bnb_nf4(params: dict, in_dir: Path, out_dir: Path, ctx: StepContext) -> dict:
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=params["quant_type"],
                             bnb_4bit_use_double_quant=params["double_quant"],
                             bnb_4bit_compute_dtype=_bnb_dtype(in_dir, ctx.device), llm_int8_skip_modules=["lm_head"])
    return _bnb("bnb_nf4", cfg, in_dir, out_dir, ctx)
