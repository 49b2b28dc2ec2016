"""Peak memory of a compression step, ESTIMATED from the model's shapes and the step's params (pure, no torch).

Why a model per step rather than one factor on the parameter count: what a step holds differs by an order of
magnitude between methods. At Llama-3.1-8B shape a LoRA step on a frozen bf16 base measured 18.0 GiB, GPTQ W4
18.2 GiB (its calibration cache lives in RAM), distillation through adapters 34.6 GiB, while full-parameter
distillation with AdamW in fp32 is estimated at ~171 GiB; one "2 bytes x params x 1.5" rule passed steps that
then ran out of memory and refused ones that fit. Preflight, the approval estimate and the step records read the
same figures, and `experiments/bench_scale.py --render` puts each next to the measured peak
(`torch.cuda.max_memory_allocated` increase during the step): experiments/results/scale-acf-gpu.md.

Everything here is an estimate of the allocator's peak (tensors alive at once), not of the process's RSS or the
CUDA context; `MARGIN` on the transient parts covers fragmentation. Training examples shorter than `seq_len` make
the measured peak lower than the estimate (it assumes full-length batches, the worst case preflight must pass).
The per-token activation model follows the Llama-style block
(RMSNorm, rotary attention through SDPA, gated MLP) in bf16, counting what autograd keeps for backward; models of
another shape get the same order of magnitude from their hidden and intermediate widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

GiB = 2 ** 30
#: allocator fragmentation and small workspaces over the sum of the large tensors
MARGIN = 1.10
#: a model this large trains through adapters with gradient checkpointing on a GPU when a step says "auto"
LEAN_TRAINING_PARAMS = 1_000_000_000


@dataclass
class Shape:
    """The facts of a model the estimates need (from acf.models.spec.ModelSpec, or a config for benchmarks)."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    #: in_features of each Linear inside one decoder block, by leaf name (q_proj: 4096, down_proj: 14336, ...)
    block_linears: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: Any) -> "Shape":
        heads = spec.num_heads or 1
        hd = spec.head_dim or spec.hidden_size // heads
        block: dict[str, tuple[int, int]] = {}
        for lin in spec.linears:
            leaf = lin.name.rsplit(".", 1)[-1]
            if leaf != "lm_head" and leaf not in block:
                block[leaf] = (lin.in_features, lin.out_features)
        return cls(params=spec.params, layers=spec.num_layers, hidden=spec.hidden_size,
                   intermediate=spec.intermediate_size or 4 * spec.hidden_size, vocab=spec.vocab_size, heads=heads,
                   kv_heads=spec.num_kv_heads or heads, head_dim=hd, block_linears=block)

    @classmethod
    def of_config(cls, cfg: Any) -> "Shape":
        """From a Llama-style transformers config (benchmarks with random weights; no model built)."""
        h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        heads = cfg.num_attention_heads
        kvh = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or h // heads
        block = {"q_proj": (h, heads * hd), "k_proj": (h, kvh * hd), "v_proj": (h, kvh * hd),
                 "o_proj": (heads * hd, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_block = sum(a * b for a, b in block.values()) + 2 * h
        emb = V * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
        return cls(params=L * per_block + emb + h, layers=L, hidden=h, intermediate=i, vocab=V, heads=heads,
                   kv_heads=kvh, head_dim=hd, block_linears=block)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_params(self, targets: Optional[list[str]] = None) -> int:
        return sum(i * o for n, (i, o) in self.block_linears.items() if targets is None or n in targets) * self.layers


@dataclass
class Estimate:
    """A step's estimated peak in bytes, with the parts it is made of (for the refusal message and records)."""

    method: str
    total: int
    parts: dict[str, int]
    how: str

    def describe(self) -> str:
        top = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return (f"{self.method} ({self.how}): about {self.total / GiB:.1f} GiB = "
                + ", ".join(f"{k} {v / GiB:.1f}" for k, v in top if v >= 0.05 * GiB)
                + f" (transient parts x{MARGIN} for the allocator)")

    def as_dict(self) -> dict:
        return {"estimated_peak_bytes": self.total, "parts": self.parts, "how": self.how,
                "what": "ESTIMATE (acf.methods.memory), allocator peak increase during the step"}


#: parts held for the whole step (exact sizes); the margin applies to the rest, the transient tensors
RESIDENT = ("weights", "teacher", "student", "adapters + AdamW", "trainable + AdamW", "Fisher sums (float32)")


def _estimate(method: str, how: str, **parts: float) -> Estimate:
    parts_i = {k: int(v) for k, v in parts.items() if v}
    resident = sum(v for k, v in parts_i.items() if k in RESIDENT)
    return Estimate(method, int(resident + (sum(parts_i.values()) - resident) * MARGIN), parts_i, how)


# ---- activations ---------------------------------------------------------------------------------------------------

def block_activation_bytes(s: Shape, tokens: int, act_bytes: int = 2) -> int:
    """What autograd keeps for one decoder block's backward over `tokens` tokens: RMSNorm inputs (float32 copies)
    and outputs, q/k/v and their rotary copies, the attention output, the gated MLP's gate, up, activation and
    product (SDPA's fused kernels keep no seq x seq matrix)."""
    h, i, kv = s.hidden, s.intermediate, s.kv_width
    elems = 2 * (2 * h) + 2 * h + (h + 2 * kv) + (h + kv) + h + 4 * i
    return tokens * elems * act_bytes


def adapter_input_bytes(s: Shape, targets: list[str], tokens: int) -> int:
    """peft casts each adapted layer's input to the adapters' float32 before the LoRA product and keeps it."""
    return tokens * sum(i for n, (i, o) in s.block_linears.items() if n in targets) * 4


def logits_bytes(s: Shape, tokens: int, per_element: int) -> int:
    return tokens * s.vocab * per_element


#: bytes per logit element of a CE training step: bf16 logits, the float32 copy, log-softmax saved for backward,
#: and its gradient in float32 and bf16. Measured against (H100/H200, random-init weights, 50 steps): Llama-3.2-1B
#: shape batch 4 x 256 and Llama-3.1-8B shape batch 4 x 512 (SPEC.md, "Memory and large models").
CE_LOGIT_BYTES = 18
#: the distillation loss: teacher and student bf16 logits, then float32 work (temperature-scaled copies, both
#: log-softmaxes, the KL terms, gradients) on the selected solution positions only (about half of a batch).
#: Fitted on the 8B run (distillation through adapters, batch 4 x 512: 34.6 GiB measured), checked on the 1B one.
KD_LOGIT_BYTES = 12
#: a no-grad forward's logits (bf16 + the float32 copy the loss reads)
EVAL_LOGIT_BYTES = 6


def training_activations(s: Shape, batch: int, seq: int, checkpointing: bool, targets: Optional[list[str]],
                         act_bytes: int = 2) -> dict[str, int]:
    t = batch * seq
    per_block = block_activation_bytes(s, t, act_bytes) + (adapter_input_bytes(s, targets, t) if targets else 0)
    if checkpointing:
        # each block's input kept; one block's activations recomputed at a time during backward
        return {"checkpointed block inputs": s.layers * t * s.hidden * act_bytes, "one block recomputed": per_block}
    return {"activations": s.layers * per_block}


# ---- per method --------------------------------------------------------------------------------------------------

def adapter_params(s: Shape, targets: list[str], rank: int) -> int:
    return sum(rank * (i + o) for n, (i, o) in s.block_linears.items() if n in targets) * s.layers


def lean(device: str, s: Shape, setting: Any) -> bool:
    """Whether an "auto" memory-lean setting (gradient checkpointing, adapters) is on."""
    if setting is None or setting == "auto":
        return device.startswith("cuda") and s.params >= LEAN_TRAINING_PARAMS
    return bool(setting)


def lora_plan(p: dict, s: Shape, device: str) -> dict:
    """How the lora step trains: base dtype, checkpointing (the step and its estimate read this one plan)."""
    qlora = bool(p.get("qlora"))
    base = "nf4" if qlora else ("bfloat16" if device.startswith("cuda") else "float32")
    return {"base_dtype": base, "gradient_checkpointing": lean(device, s, p.get("gradient_checkpointing"))}


def lora_memory(p: dict, s: Shape, device: str) -> Estimate:
    plan = lora_plan(p, s, device)
    targets = list(p.get("targets") or [])
    if plan["base_dtype"] == "nf4":
        # 4-bit weights (0.5 byte + scales); embeddings and norms cast to float32 by prepare_model_for_kbit_training
        weights = s.linear_params() * 0.53 + s.vocab * s.hidden * 4 * 2
    else:
        weights = s.params * (2 if plan["base_dtype"] == "bfloat16" else 4)
    train_tokens = p["batch_size"] * p["seq_len"]
    parts = training_activations(s, p["batch_size"], p["seq_len"], plan["gradient_checkpointing"], targets)
    parts["logits and loss"] = logits_bytes(s, train_tokens, CE_LOGIT_BYTES)
    held_tokens = 8 * p["seq_len"]     # the held-out loss before/after runs at batch 8 without grad
    held = logits_bytes(s, held_tokens, EVAL_LOGIT_BYTES) + block_activation_bytes(s, held_tokens) // 4
    if held > sum(parts.values()):
        parts = {"held-out loss pass": held}
    how = (f"{plan['base_dtype']} base, gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
           f"batch {p['batch_size']} x {p['seq_len']}")
    return _estimate("lora", how, weights=weights,
                     **{"adapters + AdamW": adapter_params(s, targets, p["rank"]) * 16}, **parts)


def distill_plan(p: dict, s: Shape, device: str) -> dict:
    adapters = lean(device, s, p.get("adapters"))
    return {"adapters": adapters, "student_dtype": "bfloat16" if adapters and device.startswith("cuda") else "float32",
            "gradient_checkpointing": lean(device, s, p.get("gradient_checkpointing"))}


DISTILL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def distill_memory(p: dict, s: Shape, device: str) -> Estimate:
    plan = distill_plan(p, s, device)
    tokens = p["batch_size"] * p["seq_len"]
    teacher = s.params * 2
    if plan["adapters"]:
        targets = [t for t in DISTILL_TARGETS if t in s.block_linears]
        student = s.params * (2 if plan["student_dtype"] == "bfloat16" else 4)
        trainable = adapter_params(s, targets, p.get("adapter_rank", 64)) * 16
        how = f"student through rank-{p.get('adapter_rank', 64)} adapters on a frozen {plan['student_dtype']} base"
    else:
        targets = None
        # float32 weights + gradients + AdamW's two moments, and autocast's bf16 copies of the weights
        student, trainable = s.params * (4 + 2), s.params * (4 + 8)
        how = "full-parameter student in float32 with AdamW"
    acts = training_activations(s, p["batch_size"], p["seq_len"], plan["gradient_checkpointing"], targets)
    how += (f", gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
            f"batch {p['batch_size']} x {p['seq_len']}")
    return _estimate("distill", how, teacher=teacher, student=student, **{"trainable + AdamW": trainable}, **acts,
                     **{"logits and KD loss": logits_bytes(s, tokens, KD_LOGIT_BYTES)})


def kd_tune_memory(p: dict, s: Shape, device: str) -> Estimate:
    """A dense student whose quantized weights are frozen (float32 on the CPU, bf16 on a GPU), the teacher, AdamW
    on the norms (and the embedding table when `embedding_lr` > 0) in float32, full activations (frozen weights
    still pass activation gradients back), and the KD logits of every position."""
    ckpt = lean(device, s, p.get("gradient_checkpointing"))
    dense = s.params * (2 if device.startswith("cuda") else 4)   # student and teacher both in the inference dtype
    table = s.vocab * s.hidden if p.get("embedding_lr") else 0
    trainable = (table + (2 * s.layers + 1) * s.hidden) * (4 + 8)
    tokens = p["batch_size"] * p["seq_len"]
    acts = training_activations(s, p["batch_size"], p["seq_len"], ckpt, None)
    how = (f"frozen dense student, AdamW on the norms{' and the embedding table' if table else ''}, gradient "
           f"checkpointing {'on' if ckpt else 'off'}, batch {p['batch_size']} x {p['seq_len']}")
    return _estimate("kd_tune", how, teacher=dense, student=dense, **{"trainable + AdamW": trainable},
                     **acts, **{"logits and KD loss": logits_bytes(s, tokens, KD_LOGIT_BYTES)})


def sensitivity_pass(p: dict, s: Shape, device: str, method: str, every_tensor: bool = False) -> Optional[Estimate]:
    """The Fisher pass of a per-layer allocation (`avg_bits` without `layer_formats`; acf.methods.mixed): the model,
    a float32 sum of squared gradients for every allocated weight (every Linear in the blocks, or `every_tensor`:
    every weight, as GGUF allocates embeddings and output too), one window's backward (activations and the CE
    logits) and one layer's gradient squared in float32 (gradients are dropped as they are summed). It runs before
    the quantizer, so the step's peak is the larger of the two. None when the step does not allocate."""
    if p.get("avg_bits") is None or p.get("layer_formats"):
        return None
    wb = 2 if device.startswith("cuda") else 4
    L = p.get("sensitivity_seq_len", 512)
    widest = max((i * o for i, o in s.block_linears.values()), default=s.hidden ** 2)
    if every_tensor:
        widest = max(widest, s.vocab * s.hidden)
    covered = s.params if every_tensor else s.linear_params()
    return _estimate(method, f"estimate: Fisher sensitivity pass of avg_bits ({L}-token windows), before "
                     "the quantizer",
                     weights=s.params * wb, **{"Fisher sums (float32)": covered * 4,
                                               "one window's activations": s.layers * block_activation_bytes(s, L, wb),
                                               "logits and loss": logits_bytes(s, L, CE_LOGIT_BYTES),
                                               "one layer's gradient and its square": widest * (wb + 4)})


def _larger(a: Estimate, b: Optional[Estimate]) -> Estimate:
    return a if b is None or a.total >= b.total else b


def calibrated_memory(method: str, hessians: bool) -> Callable[[dict, Shape, str], Estimate]:
    """llm-compressor's sequential pipeline: the model on the device, per-Linear Hessians of the block being
    calibrated (GPTQ, SparseGPT), the solver's float32 copies of the widest Linear and one sample's forward. The
    calibration activations between blocks (inputs and outputs of every sample) go to the CPU
    (`sequential_offload_device`, default "cpu"): GPU memory on a GPU, RAM on the CPU."""

    def est(p: dict, s: Shape, device: str) -> Estimate:
        wb = 2 if device.startswith("cuda") else 4
        n, L = p.get("calib_samples", 64), p.get("seq_len", 512)
        widest = max((i * o for i, o in s.block_linears.values()), default=s.hidden ** 2)
        widest_in = max((i for i, o in s.block_linears.values()), default=s.hidden)
        parts = {"weights": s.params * wb, "one block's forward": block_activation_bytes(s, L, wb) // 2}
        if not device.startswith("cuda"):
            parts["calibration activations"] = 2 * n * L * s.hidden * wb
        if hessians:
            parts["Hessians of one block"] = sum(i * i * 4 for i, o in s.block_linears.values())
            parts["solver workspace"] = widest * 4 * 2 + widest_in ** 2 * 4 * 2
        else:
            parts["solver workspace"] = widest * 4 * 2
        return _larger(_estimate(method, f"{n} x {L} calibration tokens, one block at a time", **parts),
                       sensitivity_pass(p, s, device, method))

    return est


def autoround_batch(p: dict) -> int:
    """AutoRound's tuning batch: `batch_size` samples, at most the calibration samples there are. AutoRound clips it
    itself per block (`min(nsamples, batch_size)`), but the modifier would be built with the unclipped value; clipped
    here, the step (acf.methods.quantize), its record and the time and memory estimates name the batch that runs."""
    return max(1, min(int(p.get("batch_size", 8)), int(p.get("calib_samples", 64))))


def _scale_groups(s: Shape, group_size: Optional[int]) -> int:
    """Quantization groups (one scale each) in one block's Linears: `group_size` input columns, or one per output
    channel (None)."""
    return sum(o * (i // group_size if group_size and i % group_size == 0 else 1)
               for i, o in s.block_linears.values())


def autoround_memory(p: dict, s: Shape, device: str) -> Estimate:
    """An ESTIMATE (not measured at 8B) of AutoRound through llm-compressor's sequential pipeline: the model, and
    for the one decoder block being tuned, what AutoRound's SignSGD loop holds:

    * per Linear of the block, the rounding offsets V (float32, the weight's shape), the min/max clipping scales
      (float32, one per group), each with its gradient and the best-so-far copy (`collect_best_params`); SignSGD
      at momentum 0 (AutoRound's default) keeps no optimizer state;
    * the block's weights quantize-dequantized in float32 (W + V, divided by the scale, rounded, clamped, rescaled:
      about three weight-sized float32 tensors per Linear kept for backward);
    * one batch (`autoround_batch`) forward and backward through the block, and its reference outputs;
    * the calibration activations, `calib_samples x seq_len x hidden` each: the pipeline's inputs and outputs of
      the block (as `calibrated_memory`), AutoRound's reference (unquantized) outputs and its quantized inputs of
      the next block. llm-compressor's capture hook and AutoRound (`low_gpu_mem_usage`) keep them on the CPU: RAM
      on the CPU, not GPU memory on a GPU, where only a batch of them is on the device at a time.

    A per-layer allocation (`avg_bits`) runs the Fisher pass before (`sensitivity_pass`): the peak is the larger."""
    wb = 2 if device.startswith("cuda") else 4
    n, L = p.get("calib_samples", 64), p.get("seq_len", 512)
    b = autoround_batch(p)
    block_w = sum(i * o for i, o in s.block_linears.values()) or 12 * s.hidden ** 2
    # the mixed case has several group sizes: count the smallest group acf's palettes use (32), the most scales
    g = p.get("group_size") if p.get("avg_bits") is None and not p.get("layer_formats") else 32
    scales = 2 * _scale_groups(s, g)
    parts = {"weights": s.params * wb,
             "one block's rounding params, grads, best copy": (block_w + scales) * 4 * 3,
             "one block's quantize-dequantize (float32)": block_w * 4 * 3,
             "one batch through the block": block_activation_bytes(s, b * L, wb) + 2 * b * L * s.hidden * wb}
    if not device.startswith("cuda"):
        parts["calibration activations"] = 4 * n * L * s.hidden * wb
    how = (f"estimate: {n} x {L} calibration tokens, one block tuned at a time ({p.get('iters', 200)} iters, batch "
           f"{b}); not measured at 8B")
    return _larger(_estimate("autoround", how, **parts), sensitivity_pass(p, s, device, "autoround"))


def weights_only_memory(method: str) -> Callable[[dict, Shape, str], Estimate]:
    """Data-free steps (RTN, bitsandbytes, magnitude pruning): the model plus float32 copies of the widest Linear."""

    def est(p: dict, s: Shape, device: str) -> Estimate:
        wb = 2 if device.startswith("cuda") else 4
        widest = max((i * o for i, o in s.block_linears.values()), default=s.hidden ** 2)
        return _larger(_estimate(method, "the weights plus one layer's float32 work copies", weights=s.params * wb,
                                 **{"one layer's work copies": widest * 4 * 3}),
                       sensitivity_pass(p, s, device, method, every_tensor=method == "gguf"))

    return est


def estimate_steps(steps: list[tuple[str, dict, Callable[[dict, Shape, str], Estimate]]], s: Shape,
                   device: str) -> list[Estimate]:
    return [fn(p, s, device) for _, p, fn in steps]


def refusal(estimates: list[Estimate], free_bytes: int, where: str) -> Optional[str]:
    """The reason to refuse an episode whose largest step will not fit `free_bytes`, naming the figures, or None."""
    if not estimates:
        return None
    worst = max(estimates, key=lambda e: e.total)
    if worst.total <= free_bytes:
        return None
    return (f"{where}: {free_bytes / GiB:.1f} GiB free, step {worst.describe()} (estimate; "
            f"acf.methods.memory, checked against measured peaks in SPEC.md)")
