"""The evaluation back-end protocol, and its transformers implementation.

A back end is what a candidate runs in. `acf.evaluation.runner.evaluate` dispatches every metric once over it:
- `lm`: the model handle that measurement code scores with. Three primitives are asked of it:
  teacher-forced logits (`lm(input_ids, attention_mask).logits`: answer NLL, kld, top1, kld_general), choice
  log-likelihoods (`acf.evaluation.multiple_choice.score_choices`: multiple-choice accuracy, mc1/mc2, the gold
  choice's NLL) and greedy generation (`acf.evaluation.generate.generate_all`: generation accuracy, pass@1).
  A transformers model answers them itself; another runtime's handle offers `choice_logprobs` and `complete`,
  which those two functions use instead (acf.evaluation.llamacpp.LlamaCppLM).
- `perf`: latency, ttft, throughput and memory, measured in the back end's runtime;
- `size`, `params`, `bits_per_weight`, `sparsity`: what the stored model costs;
- `forced_batch`, `reserve`: the batch and context of a teacher-forced pass;
- `stamp`: the runtime and device a measurement made through `lm` ran on.

Back ends: transformers (here), llama.cpp for GGUF candidates (acf.evaluation.llamacpp.LlamaCppBackend); vLLM
would be a third with the same methods.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch

from acf.core.provenance import Measurement, device_string, runtime_string
from acf.evaluation.batching import CPU_BATCH
from acf.core.instruments import PeakRSS
from acf.evaluation.perf import latency, model_stats, size_metric, stored_tensor_bits
from acf.models.loading import free, load_model


class Backend(Protocol):
    """What `evaluate` needs from the runtime a candidate is measured in (see the module docstring)."""

    name: str
    tokenizer: Any

    @property
    def lm(self) -> Any: ...

    def size(self) -> Measurement: ...

    def params(self) -> Measurement: ...

    def bits_per_weight(self) -> Measurement: ...

    def sparsity(self, known: Optional[Measurement]) -> Measurement: ...

    def perf(self, wanted: Sequence[str], prompt: str, *, latency_tokens: int, batch_size: Optional[int],
             longest: int) -> dict[str, Measurement]: ...

    def forced_batch(self, batch_size: Optional[int]) -> Optional[int]: ...

    def reserve(self, n_tokens: int) -> None: ...

    def stamp(self, m: Measurement, via_lm: bool) -> None: ...

    def close(self) -> None: ...


@dataclass
class Loaded:
    """A model loaded once for several evaluations of one candidate (proxy, then full), with its load's cost.

    The memory metric of a later evaluation is the peak over this load and its own generation, measured from the
    same starting point, so loading once does not hide the weights from the figure."""

    model: Any
    tokenizer: Any
    device: str
    load_seconds: float = 0.0
    rss_start: int = 0           # CPU: process RSS before the load
    rss_peak: int = 0            # CPU: peak RSS during the load
    cuda_peak: int = 0           # CUDA: max allocated during the load

    @classmethod
    def load(cls, model_dir: str | Path, device: str, trust_remote_code: bool = False) -> "Loaded":
        from acf.models.gguf_file import is_gguf_dir

        if is_gguf_dir(model_dir):
            # a GGUF candidate is measured in llama.cpp, which opens the file itself per measurement
            # (acf.evaluation.llamacpp): only the tokenizer is kept here
            from acf.models.loading import load_tokenizer

            return cls(model=None, tokenizer=load_tokenizer(model_dir, trust_remote_code), device="cpu")
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        meter = PeakRSS() if not cuda else nullcontext()
        with meter:
            model, tok = load_model(model_dir, device, trust_remote_code=trust_remote_code)
        out = cls(model=model, tokenizer=tok, device=device, load_seconds=time.perf_counter() - t0)
        if cuda:
            out.cuda_peak = int(torch.cuda.max_memory_allocated())
        else:
            out.rss_start, out.rss_peak = meter.start, meter.peak
        return out

    def free(self) -> None:
        free(self.model)
        self.model = None


class TransformersBackend:
    """A checkpoint directory loaded in transformers (loaded on first use, or given `loaded`, which it then does
    not free)."""

    name = "transformers"

    def __init__(self, model_dir: Path, device: str, *, loaded: Optional[Loaded] = None,
                 trust_remote_code: bool = False):
        self.model_dir = Path(model_dir)
        self.device = device
        self.trust_remote_code = trust_remote_code
        self._loaded = loaded
        self._own = loaded is None
        self._stats: Optional[dict] = None

    @property
    def loaded(self) -> Loaded:
        if self._loaded is None:
            self._loaded = Loaded.load(self.model_dir, self.device, trust_remote_code=self.trust_remote_code)
        return self._loaded

    @property
    def lm(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def _model_stats(self) -> dict:
        if self._stats is None:
            self._stats = model_stats(self.lm)
        return self._stats

    def size(self) -> Measurement:
        return size_metric(self.model_dir)

    def params(self) -> Measurement:
        return Measurement(value=float(self._model_stats()["params"]), unit="count",
                           device=device_string(self.device),
                           method="logical parameters of the loaded model (tied weights once; quantization "
                                  "scales, zero points and g_idx not counted)")

    def bits_per_weight(self) -> Measurement:
        bits = stored_tensor_bits(self.model_dir)
        if bits is None:
            return Measurement(value=None, unit="bits", device="disk",
                               method="stored tensor bits from safetensors headers")
        return Measurement(value=round(bits / max(self._model_stats()["params"], 1), 4), unit="bits", device="disk",
                           method="stored tensor bits (safetensors headers, scales included) / logical parameters")

    def sparsity(self, known: Optional[Measurement]) -> Measurement:
        """Exact zeros of Linear weights; for a quantized model, what its pruning steps measured before quantizing.

        A dequantized W4 grid holds exact zeros (about 15% for symmetric int4) that no sparse kernel can use and
        no pruning made, so counting them would report sparsity a quantize-only recipe does not have."""
        from acf.models.loading import quant_method

        if quant_method(self.model_dir) is not None:
            if known is not None:
                return known
            return Measurement(value=None, unit="fraction", device=device_string(self.device),
                               method="not measurable on a quantized model's dequantized weights (its grid has exact "
                                      "zeros); the pipeline records the sparsity its pruning steps measured")
        st = self._model_stats()
        v = st["linear_zeros"] / st["linear_weights"] if st["linear_weights"] else None
        return Measurement(value=v, unit="fraction", device=device_string(self.device),
                           method="share of exact zeros in Linear weights (lm_head excluded)",
                           extra={"note": "n/a for packed bnb weights"} if v is None else {})

    def perf(self, wanted: Sequence[str], prompt: str, *, latency_tokens: int, batch_size: Optional[int],
             longest: int) -> dict[str, Measurement]:
        """Latency, ttft and throughput (when one is wanted; else a short warm generation) and the memory peak
        over the load and this generation. The throughput probe uses a fixed batch so its figure is comparable
        across models."""
        model, tok, device, loaded = self.lm, self.tokenizer, self.device, self.loaded
        cuda = device.startswith("cuda")
        out: dict[str, Measurement] = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss = PeakRSS() if not cuda else nullcontext()
        with rss:
            if any(m != "memory" for m in wanted):         # a timing metric: the latency probe times all three
                out.update(latency(model, tok, prompt, new_tokens=latency_tokens,
                                   throughput_batch=batch_size or (64 if cuda else CPU_BATCH)))
            else:
                enc = tok([prompt], return_tensors="pt").to(device)
                with torch.inference_mode():
                    model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        if cuda:
            peak = max(loaded.cuda_peak, int(torch.cuda.max_memory_allocated()))
            how = "torch.cuda.max_memory_allocated over load + latency/throughput generation"
        else:
            peak = max(loaded.rss_peak, rss.peak) - loaded.rss_start
            how = "peak process RSS increase (sampled every 5 ms) over load + latency/throughput generation"
        out["memory"] = Measurement(value=float(peak), unit="bytes", device=device_string(device),
                                    runtime=runtime_string(), method=how,
                                    extra={"load_seconds": round(loaded.load_seconds, 3)})
        return out

    def forced_batch(self, batch_size: Optional[int]) -> Optional[int]:
        return batch_size

    def reserve(self, n_tokens: int) -> None:
        """A transformers model needs no context sized before a teacher-forced pass."""

    def stamp(self, m: Measurement, via_lm: bool) -> None:
        """Measurements through a transformers model name their device and runtime already."""

    def close(self) -> None:
        if self._own and self._loaded is not None:
            self._loaded.free()
