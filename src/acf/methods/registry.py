"""The method registry: every compression method is declared here once, and everything else reads it.

A method used to be spread over eight places (its params class and a METHODS row, an implementation table, the
search space's choices/suggest/grid, the planner's inverse mapping, two cost models and the agent cards), and they
drifted apart (autoround had a card but no place in the search space). A `MethodSpec` now carries all of it:

* name, kind, params model (validation, `acf methods`, the planner prompt),
* `impl`, the implementation as "module:function" (imported only when a step runs: it pulls in torch),
* `search`, a `SearchFragment`: how the Optuna space proposes the method's params, the inverse mapping the planner
  uses to replay a proposal as a trial, and its preset-grid entries,
* `cost`, a `CostModel` read by the approval estimate, preflight and the `estimate_cost` tool alike,
* `card` and `card_ranges`: which agent card (agents/*.md) offers it and the ranges that card shows,
* `check`: its own validation rules beyond the params model (acf.methods.checks); flags read by validation and
  preflight (needs_cuda, group_sized, needs_teacher).

`register(MethodSpec(...))` is the whole contract for a new method. The module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel

from acf.methods import checks
from acf.methods import memory as M
from acf.methods import nominal as NB
from acf.methods.fragments import (SearchFragment, drop_layers_fragment, gguf_fragment, no_params, recovery,
                                   tune_fragment, weight_quant, weight_sparsity)
from acf.methods.params import (AWQParams, AutoRoundParams, BnbInt8Params, BnbNF4Params, DistillParams,
                                DropLayersParams, GGUFParams, GPTQParams, KDTuneParams, LoraParams, MagnitudeParams,
                                RTNParams, SparsityParams, W8A8Params)

Kind = Literal["quantize", "prune", "distill", "lora", "tune"]
KINDS: tuple[str, ...] = ("quantize", "prune", "distill", "lora", "tune")
#: the search space's slot for each kind: prune -> recover (distill/lora) -> quant -> tune (after quantization)
SLOT_OF_KIND = {"prune": "prune", "distill": "recover", "lora": "recover", "quantize": "quant", "tune": "tune"}
SLOTS = ("prune", "recover", "quant", "tune")

# ---- the cost model ------------------------------------------------------------------------------------------------

#: effective (not peak) throughput, fitted (median log error) to the 209 step times recorded by the committed runs
#: on the default model (experiments/bench_cost_model.py -> experiments/results/cost-model.md): the CPU figure is
#: the 2-core development machine's; the GPU figure is what a 135M model reaches on an H100/H200 (launch-bound),
#: assumed to grow with model size up to GPU_FLOPS_FULL at GPU_FULL_PARAMS (an assumption, not measured)
FLOPS = {"cpu": 3e11, "cuda": 2.5e12}
GPU_FLOPS_FULL = 5e13
GPU_FULL_PARAMS = 2.7e9
#: seconds per 100M parameters to load and save a model (same fit)
LOAD_SAVE_S = {"cpu": 4.0, "cuda": 2.0}
#: seconds every step spends beyond its model's load, save and compute (imports, library set-up; same fit)
STEP_OVERHEAD_S = {"cpu": 10.0, "cuda": 2.0}


def effective_flops(kind: str, n_params: int) -> float:
    """The throughput the cost model assumes for a model of `n_params` on `kind` ("cpu" or "cuda")."""
    if kind == "cuda":
        return max(FLOPS["cuda"], GPU_FLOPS_FULL * min(1.0, n_params / GPU_FULL_PARAMS))
    return FLOPS[kind]


@dataclass(frozen=True)
class CostModel:
    """A step's compute time beyond load and save, from its filled params: `compute(params, n_params, fwd_tok)`
    where fwd_tok is the seconds one forward token takes on the device. One model for every reader (approval
    estimate, preflight, the `estimate_cost` tool), so the numbers they show agree."""

    compute: Callable[[dict, int, float], float]
    how: str = ""
    #: whether the step pays STEP_OVERHEAD_S (a calibration or training library's set-up); a pass over the weights
    #: does not (measured: bitsandbytes, RTN and magnitude steps take about the load and save alone)
    setup: bool = True


def calibrated(passes: float) -> CostModel:
    """`passes` forwards over the calibration tokens (measured relative costs on the default model)."""
    return CostModel(lambda p, n, f: passes * p["calib_samples"] * p["seq_len"] * f,
                     f"{passes:g} forward passes over the calibration tokens")


def data_free() -> CostModel:
    """A pass over the weights only (RTN, bitsandbytes, magnitude pruning)."""
    return CostModel(lambda p, n, f: n * 2e-9, "one pass over the weights", setup=False)


def training(teacher: bool) -> CostModel:
    """Forward + backward per training token (examples are ~0.6 of seq_len on average); a teacher adds a forward."""
    return CostModel(lambda p, n, f: p["steps"] * p["batch_size"] * p["seq_len"] * 0.6 * (4 if teacher else 3) * f,
                     "forward + backward per training token" + (" plus the teacher's forward" if teacher else ""))


def _autoround_cost() -> CostModel:
    """An ESTIMATE: each block runs `iters` forward + backward passes (about 3 forwards) of one batch
    (`memory.autoround_batch`), so over all blocks iters x batch x seq_len tokens of a whole-model forward, x3;
    plus three forwards over the calibration tokens (the pipeline's, AutoRound's reference outputs, the quantized
    inputs of the next block). The quantize-dequantize of the weights at every step is left out (small next to the
    matmuls at these batch sizes)."""
    def secs(p: dict, n: int, f: float) -> float:
        return 3 * (p["iters"] * M.autoround_batch(p) + p["calib_samples"]) * p["seq_len"] * f

    return CostModel(secs,
                     "estimate: iters x forward + backward of a batch per block, plus 3 forwards over the "
                     "calibration tokens")


def _gguf_cost() -> CostModel:
    imatrix = calibrated(1)
    return CostModel(lambda p, n, f: n * 2e-9 + (imatrix.compute(p, n, f) if p.get("imatrix") else 0.0),
                     "one pass over the weights, plus a forward over the calibration text for the importance matrix")


def estimate_step_seconds(method: str, params: dict, n_params: int, device: str) -> float:
    """Rough wall seconds of one step (an ESTIMATE, never a measurement): load + save, the method's compute, and
    the mixed-precision sensitivity pass when the step allocates bits (`avg_bits`)."""
    spec = get(method)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    fwd_tok = 2.0 * n_params / effective_flops(kind, n_params)
    secs = LOAD_SAVE_S[kind] * n_params / 1e8
    try:
        p = spec.params.model_validate(params).model_dump() if spec is not None else None
    except ValueError:   # an invalid step is refused by validation, not here: count its load and save only
        p = None
    if spec is not None and p is not None:
        secs += spec.cost.compute(p, n_params, fwd_tok) + (STEP_OVERHEAD_S[kind] if spec.cost.setup else 0.0)
        if p.get("avg_bits") is not None:   # one forward + backward per sensitivity window
            secs += 3 * p["sensitivity_samples"] * p["sensitivity_seq_len"] * fwd_tok
    return round(max(secs, 1.0), 1)


def estimate_step_memory(method: str, params: dict, shape: Any, device: str) -> Optional[Any]:
    """The step's estimated peak memory (acf.methods.memory.Estimate), or None for an unknown method or invalid
    params (validation refuses those, not this)."""
    spec = get(method)
    if spec is None:
        return None
    try:
        p = spec.params.model_validate(params).model_dump()
    except ValueError:
        return None
    return spec.memory(p, shape, device)


# ---- the spec and the registry -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    """One compression method, declared once (see the module docstring for who reads which field)."""

    name: str
    kind: Kind
    params: type[BaseModel]
    impl: str                                   # "module:function"; (params, in_dir, out_dir, StepContext) -> dict
    description: str
    library: str
    cost: CostModel
    card: str                                   # the agent card offering it: quantization | pruning | lora | ...
    card_ranges: dict[str, Any] = field(default_factory=dict)
    search: Optional[SearchFragment] = None     # None: runs when named, never proposed by the search
    needs_cuda: bool = False
    group_sized: bool = False                   # has a group_size that must divide the layer widths
    needs_teacher: bool = False                 # loads the uncompressed model beside the student (preflight)
    #: a quantizer whose output (weight-only compressed-tensors) keeps 16-bit tensors a `tune` step may train
    tunable: bool = False
    #: the step's peak memory: (filled params, acf.methods.memory.Shape, device) -> Estimate; preflight refuses an
    #: episode whose largest step exceeds the free memory, and the step records carry it beside the measured peak
    memory: Callable[[dict, Any, str], Any] = field(default_factory=lambda: M.weights_only_memory("step"))
    #: the method's own validation rules beyond its params model: (where, params, spec, device) -> problems
    check: Optional[Callable[[str, Any, Any, str], list[str]]] = None
    #: a quantizer's nominal bits per quantized Linear weight from its params (acf.methods.nominal): what the
    #: search's size and damage predictions start from (acf.search.surrogate); None for other kinds
    stored_bits: Optional[Callable[[dict, Any], Optional[float]]] = None

    @property
    def slot(self) -> str:
        return SLOT_OF_KIND[self.kind]


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Declare a method (or replace one of the same name). Checked here so a bad declaration fails at import, not
    half-way through a run."""
    problems = []
    if spec.kind not in KINDS:
        problems.append(f"kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if not (isinstance(spec.params, type) and issubclass(spec.params, BaseModel)):
        problems.append("params must be a pydantic model class")
    if spec.impl.count(":") != 1:
        problems.append(f"impl {spec.impl!r} must be 'module:function'")
    if not spec.name or not spec.name.replace("_", "").isalnum() or spec.name == "none":
        problems.append(f"name {spec.name!r} must be a word other than 'none'")
    if problems:
        raise ValueError(f"method {spec.name!r}: " + "; ".join(problems))
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> Optional[MethodSpec]:
    return _REGISTRY.get(name)


def all_methods() -> dict[str, MethodSpec]:
    """The live registry (name -> spec), in declaration order."""
    return _REGISTRY


def choices(slot: str, everything: bool = False) -> list[str]:
    """The search space's choices for a slot, 'none' first: the default space, or every searchable method."""
    ms = [m for m in _REGISTRY.values() if m.slot == slot and m.search is not None
          and (everything or m.search.default)]
    return ["none"] + [m.name for m in sorted(ms, key=lambda m: m.search.rank)]  # type: ignore[union-attr]


def grid_methods() -> list[MethodSpec]:
    """Searchable methods in preset-grid order."""
    ms = [m for m in _REGISTRY.values() if m.search is not None]
    return sorted(ms, key=lambda m: m.search.rank if m.search.grid_rank is None else m.search.grid_rank)  # type: ignore


# ---- the built-in methods ------------------------------------------------------------------------------------------

_CAL = {"calib_samples": [32, 512], "seq_len": [256, 2048]}
_GROUPS = [32, 64, 128, None]

for _spec in [
    MethodSpec(name="gptq", kind="quantize", tunable=True, params=GPTQParams, impl="acf.methods.quantize:gptq",
               memory=M.calibrated_memory("gptq", hessians=True),
               library="llmcompressor GPTQModifier", group_sized=True,
               description="GPTQ weight quantization (second-order, calibrated)", cost=calibrated(3),
               search=weight_quant(GPTQParams, 0, mixed=True, calib=True, act_order=True), card="quantization",
               stored_bits=NB.int_weights(),
               card_ranges={"bits": [2, 3, 4, 8], "group_size": _GROUPS, "symmetric": [True, False],
                            "act_order": [False, True], **_CAL, "avg_bits": [3.5, 6.0]}),
    MethodSpec(name="awq", kind="quantize", tunable=True, params=AWQParams, impl="acf.methods.quantize:awq",
               memory=M.calibrated_memory("awq", hessians=False),
               library="llmcompressor AWQModifier", group_sized=True, description="activation-aware weight quantization",
               cost=calibrated(20), search=weight_quant(AWQParams, 1, mixed=False, calib=True, fixed_bits=4),
               stored_bits=NB.int_weights(zero_point_default=True),
               card="quantization", card_ranges={"bits": [4, 8], "group_size": _GROUPS, "symmetric": [False, True],
                                                 "calib_samples": [32, 256], "seq_len": [256, 1024]}),
    MethodSpec(name="rtn", kind="quantize", tunable=True, params=RTNParams, impl="acf.methods.quantize:rtn",
               memory=M.weights_only_memory("rtn"),
               library="llmcompressor QuantizationModifier", group_sized=True,
               description="round-to-nearest weight quantization (no calibration)", cost=data_free(),
               search=weight_quant(RTNParams, 2, mixed=True, calib=False), card="quantization",
               stored_bits=NB.int_weights(),
               card_ranges={"bits": [4, 8], "group_size": _GROUPS, "symmetric": [True, False],
                            "avg_bits": [3.5, 6.0]}),
    MethodSpec(name="autoround", kind="quantize", tunable=True, params=AutoRoundParams,
               impl="acf.methods.quantize:autoround",
               memory=M.autoround_memory,
               library="llmcompressor AutoRoundModifier", group_sized=True,
               description="AutoRound: signed-gradient rounding optimisation", cost=_autoround_cost(),
               # in the default space with the precision dimension (uniform or a budget), as GPTQ; iters stays at
               # AutoRound's 200. In the preset grid at W4 only: 8-bit rounding is near lossless without tuning
               # (RTN/GPTQ W8 are in the grid), so a W8 AutoRound entry would spend 200 iters per block for nothing
               search=weight_quant(AutoRoundParams, 7, mixed=True, calib=True, grid_bits=(4,)),
               stored_bits=NB.int_weights(),
               card="quantization", card_ranges={"bits": [2, 3, 4], "group_size": [32, 64, 128], "iters": [50, 500],
                                                 "avg_bits": [3.5, 6.0], "calib_samples": [32, 256],
                                                 "seq_len": [256, 2048]}),
    MethodSpec(name="w8a8", kind="quantize", params=W8A8Params, impl="acf.methods.quantize:w8a8",
               memory=M.calibrated_memory("w8a8", hessians=True),
               library="llmcompressor SmoothQuant + GPTQ W8A8",
               description="int8 weights and activations with SmoothQuant", cost=calibrated(6),
               search=no_params(calib=True, rank=3), card="quantization", stored_bits=NB.constant(8.0),
               card_ranges={"smoothing_strength": [0.5, 0.95], **_CAL}),
    MethodSpec(name="bnb_int8", kind="quantize", params=BnbInt8Params, impl="acf.methods.quantize:bnb_int8",
               memory=M.weights_only_memory("bnb_int8"),
               library="bitsandbytes LLM.int8()", description="bitsandbytes int8 (CPU and CUDA)", cost=data_free(),
               search=no_params(rank=5), card="quantization", card_ranges={"threshold": [4.0, 8.0]},
               stored_bits=NB.constant(8.0)),
    MethodSpec(name="bnb_nf4", kind="quantize", params=BnbNF4Params, impl="acf.methods.quantize:bnb_nf4",
               memory=M.weights_only_memory("bnb_nf4"),
               library="bitsandbytes 4-bit", description="bitsandbytes NF4/FP4 (CPU and CUDA; QLoRA base)",
               cost=data_free(), search=no_params(rank=4), card="quantization", stored_bits=NB.constant(4.5),
               card_ranges={"quant_type": ["nf4", "fp4"], "double_quant": [True, False]}),
    MethodSpec(name="gguf", kind="quantize", params=GGUFParams, impl="acf.methods.gguf_export:gguf",
               memory=M.weights_only_memory("gguf"),
               library="llama.cpp (convert_hf_to_gguf.py + llama_model_quantize via llama-cpp-python)",
               description="GGUF export for llama.cpp (k-quants, IQ4, Q8_0/Q4_0) with an importance matrix",
               cost=_gguf_cost(), search=gguf_fragment(), card="quantization", check=checks.gguf,
               stored_bits=NB.gguf_bits,
               card_ranges={"type": ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M"],
                            "imatrix": [True, False], "calib_samples": [32, 256], "seq_len": [256, 1024]}),
    MethodSpec(name="magnitude", kind="prune", params=MagnitudeParams, impl="acf.methods.prune:magnitude",
               memory=M.weights_only_memory("magnitude"),
               library="acf (torch; hand-written: see acf.methods.prune.magnitude)",
               description="prune the smallest-magnitude weights",
               cost=data_free(), search=weight_sparsity(calib=False, rank=0, grid_rank=12), card="pruning",
               card_ranges={"sparsity": [0.1, 0.7], "pattern": ["unstructured", "2:4"]}),
    MethodSpec(name="wanda", kind="prune", params=SparsityParams, impl="acf.methods.prune:wanda",
               memory=M.calibrated_memory("wanda", hessians=False),
               library="llmcompressor WandaPruningModifier", description="Wanda: |W| x input-activation norm",
               cost=calibrated(2), search=weight_sparsity(calib=True, rank=1, grid_rank=11), card="pruning",
               card_ranges={"sparsity": [0.1, 0.7], "pattern": ["unstructured", "2:4", "4:8"],
                            "calib_samples": [16, 256], "seq_len": [256, 2048]}),
    MethodSpec(name="sparsegpt", kind="prune", params=SparsityParams, impl="acf.methods.prune:sparsegpt",
               memory=M.calibrated_memory("sparsegpt", hessians=True),
               library="llmcompressor SparseGPTModifier", description="SparseGPT: second-order one-shot pruning",
               cost=calibrated(4), search=weight_sparsity(calib=True, rank=2, grid_rank=10), card="pruning",
               card_ranges={"sparsity": [0.1, 0.7], "pattern": ["unstructured", "2:4", "4:8"],
                            "calib_samples": [16, 256], "seq_len": [256, 2048]}),
    MethodSpec(name="drop_layers", kind="prune", params=DropLayersParams, impl="acf.methods.prune:drop_layers",
               memory=M.calibrated_memory("drop_layers", hessians=False),
               library="acf (hand-written: no library removes decoder blocks by measured importance)",
               description="depth pruning: remove whole decoder blocks", cost=calibrated(1),
               search=drop_layers_fragment(), card="pruning", check=checks.drop_layers,
               card_ranges={"by": ["importance", "last", "first", "weight_range", "explicit"],
                            "count": [1, "num_layers/2"], "ratio": [0.05, 0.5], "calib_samples": [8, 128],
                            "seq_len": [128, 1024]}),
    MethodSpec(name="distill", kind="distill", params=DistillParams, impl="acf.methods.distill:distill",
               memory=M.distill_memory,
               library="acf + torch (KL at temperature T + CE)",
               description="knowledge distillation from the uncompressed teacher", cost=training(teacher=True),
               search=recovery(DistillParams, 1), card="distillation", needs_teacher=True,
               card_ranges={"steps": [20, 2000], "lr": [1.0e-5, 5.0e-4], "temperature": [1.0, 4.0],
                            "alpha": [0.3, 0.9], "batch_size": [2, 16], "seq_len": [128, 512],
                            "samples": [128, 4096]}),
    MethodSpec(name="kd_tune", kind="tune", params=KDTuneParams, impl="acf.methods.kd_tune:kd_tune",
               memory=M.kd_tune_memory,
               library="acf + torch + safetensors (hand-written: no library trains a quantized checkpoint's 16-bit "
                       "tensors)",
               description="after weight-only quantization, distil the uncompressed teacher into the tensors kept "
                           "in 16 bits (norms; the embedding table with embedding_lr > 0); quantized weights frozen, "
                           "size unchanged",
               cost=training(teacher=True), search=tune_fragment(0), card="distillation", needs_teacher=True,
               card_ranges={"steps": [20, 2000], "lr": [1.0e-4, 5.0e-3], "embedding_lr": [0.0, 1.0e-4],
                            "scale_lr": [0.0, 1.0e-3],
                            "batch_size": [2, 16], "seq_len": [128, 512], "samples": [128, 4096]}),
    MethodSpec(name="lora", kind="lora", params=LoraParams, impl="acf.methods.lora:lora",
               memory=M.lora_memory,
               library="peft LoRA, merged with merge_and_unload",
               description="LoRA recovery fine-tune (QLoRA on a bnb 4-bit base)", cost=training(teacher=False),
               search=recovery(LoraParams, 0), card="lora", check=checks.lora,
               card_ranges={"rank": [4, 64], "alpha": [8, 128], "dropout": [0.0, 0.1], "steps": [20, 2000],
                            "lr": [5.0e-5, 1.0e-3], "batch_size": [2, 16], "seq_len": [128, 512],
                            "samples": [128, 4096], "qlora": [False, True],
                            "targets": [["q_proj", "k_proj", "v_proj", "o_proj"],
                                        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"]]}),
]:
    register(_spec)
del _spec
