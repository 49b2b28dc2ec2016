"""The parameter models of the built-in compression methods (pydantic: they validate what a strategy JSON says).

Pure declarations, no heavy imports: the method registry (acf.methods.registry), validation, the planner and the
CLI read them without loading torch.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown names are errors (a typo must not silently use a default)."""

    model_config = ConfigDict(extra="forbid")



class Calib(MethodParams):
    calib_samples: int = Field(64, ge=1, le=4096, description="calibration samples from the task's train split")
    seq_len: int = Field(512, ge=16, le=8192, description="tokens per calibration sample")


class MixedPrecision(MethodParams):
    """Per-layer formats under a budget (acf.methods.mixed): set `avg_bits` to allocate, or `layer_formats` to
    replay an allocation; with neither, the step is uniform (`bits`, `group_size`)."""
    avg_bits: Optional[float] = Field(None, ge=2, le=16, description="effective bits per weight of the quantized "
                                      "layers (values, scales, shapes); the allocator chooses a format per layer")
    formats: Optional[list[str]] = Field(None, description="palette for avg_bits, e.g. ['w3g64','w4g64','w8','bf16']; "
                                         "default: 3/4 bits at the largest valid group, 4 bits at half that group "
                                         "and per channel, 8 bits per channel, bf16 kept")
    layer_formats: Optional[dict[str, str]] = Field(None, description="explicit format per quantizable layer "
                                                    "(an allocation to replay)")
    sensitivity_samples: int = Field(16, ge=1, le=1024, description="calibration windows of the Fisher "
                                     "sensitivity pass (avg_bits)")
    sensitivity_seq_len: int = Field(512, ge=16, le=8192, description="tokens per sensitivity window")
    target: Literal["vllm", "transformers"] = Field("vllm", description="where the allocation is meant to run: "
                                                    "'vllm' gives one format to each layer vLLM fuses (q/k/v, "
                                                    "gate/up) and only formats vLLM's int kernels serve (4/8 bits, "
                                                    "groups 32/64/128, per channel; acf.methods.vllm_rules); "
                                                    "'transformers' any format per Linear")


class GPTQParams(Calib, MixedPrecision):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Optional[int] = Field(64, description="None = per output channel")
    symmetric: bool = True
    act_order: bool = False
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class AWQParams(Calib):
    bits: Literal[4, 8] = 4
    group_size: Optional[int] = 64
    symmetric: bool = False
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class RTNParams(MixedPrecision):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Optional[int] = 64
    symmetric: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class AutoRoundParams(Calib, MixedPrecision):
    """AutoRound (signed-gradient tuning of the rounding and the clipping range, one decoder block at a time), uniform
    (`bits`, `group_size`) or per-layer formats under a budget (`avg_bits` / `layer_formats`), as GPTQ."""
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Optional[int] = 64
    symmetric: bool = True
    iters: int = Field(200, ge=1, le=10000, description="tuning steps per decoder block (AutoRound's default 200)")
    batch_size: int = Field(8, ge=1, le=512, description="calibration samples per tuning step (AutoRound's default "
                            "8); at most calib_samples are used")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class W8A8Params(Calib):
    smoothing_strength: float = Field(0.8, gt=0, lt=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


class BnbInt8Params(MethodParams):
    threshold: float = Field(6.0, ge=0)


class BnbNF4Params(MethodParams):
    double_quant: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"


class SparsityParams(Calib):
    sparsity: float = Field(0.5, gt=0, lt=1)
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' such as '2:4'")


class MagnitudeParams(MethodParams):
    sparsity: float = Field(0.5, gt=0, lt=1)
    pattern: str = "unstructured"


class DropLayersParams(Calib):
    count: Optional[int] = Field(None, ge=1, description="number of decoder blocks to remove")
    ratio: Optional[float] = Field(None, gt=0, lt=1, description="share of blocks to remove (if count is not set)")
    by: Literal["importance", "first", "last", "weight_range", "explicit"] = "importance"
    layers: Optional[list[int]] = Field(None, description="explicit block indices to remove (by=explicit)")
    weight_range: Optional[tuple[float, float]] = Field(None, description="drop blocks whose mean |W| lies in [lo, hi]")


class DistillParams(MethodParams):
    steps: int = Field(50, ge=1, le=100000)
    lr: float = Field(1e-4, gt=0, lt=1)
    temperature: float = Field(2.0, gt=0, le=20)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term; 1-alpha weights cross-entropy")
    batch_size: int = Field(4, ge=1, le=512)
    seq_len: int = Field(256, ge=16, le=8192)
    samples: int = Field(512, ge=1)
    adapters: Optional[bool] = Field(None, description="train the student through LoRA adapters on a frozen base "
                                     "(merged after training) instead of every weight with AdamW in float32; None: "
                                     "adapters for models of 1B+ parameters on a GPU (acf.methods.memory)")
    adapter_rank: int = Field(64, ge=1, le=1024, description="rank of those adapters")
    gradient_checkpointing: Optional[bool] = Field(None, description="recompute each block's activations in the "
                                                   "backward pass; None: on for models of 1B+ parameters on a GPU")


class KDTuneParams(MethodParams):
    """Distillation after quantization into the parameters the quantizer kept in 16 bits, and with scale_lr > 0 into
    its quantization scales (acf.methods.kd_tune)."""
    steps: int = Field(100, ge=1, le=100000)
    lr: float = Field(1e-3, gt=0, lt=1, description="learning rate of the norm weights (and biases)")
    # 0 by default: on the default model (H100, GPTQ 4.25 bits, 100 steps) training the 28M-entry table as well
    # reached the same kld as the norms alone (0.0661 vs 0.0667, intervals overlapping) in twice the time
    # (experiments/results/mixed-cuda.md); at 8B the table with AdamW would add ~6 GB
    embedding_lr: float = Field(0.0, ge=0, lt=1, description="learning rate of the 16-bit embedding / lm_head "
                                "table (tied or not); 0 keeps it frozen")
    # 0 by default, so the step stays the norms-only one measured above. Why the option: the quantizer picked each
    # group's scale to fit its own layer's weights (or Hessian-weighted error), not the model's output; training the
    # scales against the teacher with the integer codes frozen (MLX's DWQ) reaches many more parameters than the
    # norms (one per group) and leaves the size unchanged. A relative rate: the scales span orders of magnitude.
    scale_lr: float = Field(0.0, ge=0, lt=1, description="learning rate of the quantization scales (weight_scale, "
                            "one per group / channel), as a relative step (each scale is stored_scale x a trained "
                            "factor); integer codes and zero points stay frozen; 0 keeps the scales as quantized")
    batch_size: int = Field(4, ge=1, le=512)
    seq_len: int = Field(256, ge=16, le=8192)
    samples: int = Field(512, ge=1, description="train-split examples (prompt + reference, the chat format "
                         "evaluation uses); every token is scored against the teacher, none against the reference")
    gradient_checkpointing: Optional[bool] = Field(None, description="recompute each block's activations in the "
                                                   "backward pass; None: on for models of 1B+ parameters on a GPU")


class LoraParams(MethodParams):
    rank: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096)
    # 0 by default: peft's dropout on every adapted layer's input doubled the forward time of a SmolLM2-135M LoRA
    # step on the CPU (3.1 s vs 1.6 s, batch 4 x 256, bf16 autocast), and a recovery fine-tune of tens of steps
    # does not overfit. Set it for long runs.
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    steps: int = Field(50, ge=1, le=100000)
    lr: float = Field(2e-4, gt=0, lt=1)
    batch_size: int = Field(4, ge=1, le=512)
    seq_len: int = Field(256, ge=16, le=8192)
    samples: int = Field(512, ge=1)
    qlora: bool = Field(False, description="train on a bnb 4-bit base (the previous step must be bnb_nf4)")
    gradient_checkpointing: Optional[bool] = Field(None, description="recompute each block's activations in the "
                                                   "backward pass; None: on for models of 1B+ parameters on a GPU")


class GGUFParams(Calib):
    """llama.cpp GGUF export (acf.methods.gguf): llama.cpp's converter, then its quantizer with an optional importance matrix.

    calib_samples/seq_len size the importance matrix's calibration text (used only with imatrix=true)."""

    type: str = Field("Q4_K_M", description="llama.cpp file type: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_0, Q4_K_M, Q4_K_S, "
                                            "Q4_0, IQ4_XS, IQ4_NL, Q3_K_M, Q2_K, F16, BF16 (not used with avg_bits)")
    imatrix: bool = Field(True, description="importance matrix from the task's calibration text, used by the "
                                            "quantizer (IQ types and low-bit k-quants need one)")
    overrides: dict[str, str] = Field(default_factory=dict, description="per-tensor types: regex on GGUF tensor "
                                      "names -> ggml type, e.g. {\"output\\\\.weight\": \"Q8_0\"}")
    strict_shapes: bool = Field(False, description="refuse a type whose block size leaves some layers to "
                                                   "llama.cpp's fallback type")
    avg_bits: Optional[float] = Field(None, ge=2, le=16, description="per-tensor types under this budget (bits per "
                                      "weight of all quantized matrices, token embedding included), allocated from a "
                                      "Fisher estimate of llama.cpp's own quantization error (acf.methods.gguf_mixed); "
                                      "written as overrides")
    types: Optional[list[str]] = Field(None, description="palette for avg_bits (ggml tensor types); default: Q3_K, "
                                       "IQ4_XS, Q4_K, Q5_K, Q6_K, IQ4_NL, Q4_0, Q5_0, Q5_1, Q8_0, F16")
    sensitivity_samples: int = Field(16, ge=1, le=1024, description="calibration windows of the sensitivity pass")
    sensitivity_seq_len: int = Field(512, ge=16, le=8192, description="tokens per sensitivity window")


__all__ = ["MethodParams", "Calib", "MixedPrecision", "GPTQParams", "AWQParams", "RTNParams", "AutoRoundParams",
           "W8A8Params", "BnbInt8Params", "BnbNF4Params", "SparsityParams", "MagnitudeParams", "DropLayersParams",
           "DistillParams", "LoraParams", "GGUFParams"]
