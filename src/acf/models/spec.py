"""Model spec: shapes and counts inferred from the config (on the meta device, no weights loaded).

The spec is what strategies are validated against: e.g. a quantization group size is valid only if it
divides the input width of every Linear layer it targets (SmolLM2-135M: 576 and 1536 wide -> 32, 64 valid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, Field

from acf.core.atomic import write_text
from acf.models.loading import load_config, load_tokenizer
from acf.models.tokenization import adds_bos

GROUP_SIZE_CANDIDATES = (16, 32, 64, 128, 256)


class LinearInfo(BaseModel):
    name: str
    in_features: int
    out_features: int
    bias: bool = False   # default: model_spec.json files written before this field still load


class ModelSpec(BaseModel):
    path: str
    family: str
    architecture: str
    params: int
    linear_params: int
    embedding_params: int
    num_layers: int
    hidden_size: int
    intermediate_size: Optional[int]
    num_heads: Optional[int]
    num_kv_heads: Optional[int]
    head_dim: Optional[int]
    vocab_size: int
    tied_embeddings: bool
    dtype: str
    bytes_per_param: int
    linears: list[LinearInfo]
    valid_group_sizes: list[int]
    invalid_group_sizes: dict[int, list[str]]
    memory_estimate_bytes: dict[str, int]
    quantized: Optional[str] = None
    # Tokenizer facts acf acts on (evaluation, calibration and training prompts follow them). Defaults keep
    # model_spec.json files written before these fields loadable; None there means "not recorded".
    adds_bos: Optional[bool] = Field(None, description="the tokenizer puts BOS in front of a text itself, so every "
                                     "prompt acf encodes starts with BOS exactly once (acf.models.tokenization)")
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    chat_template: Optional[bool] = Field(None, description="a chat template is present: zero-shot prompts use it")
    tokenizer_vocab_size: Optional[int] = Field(None, description="len(tokenizer), added tokens included; may be "
                                                "below vocab_size (the embedding rows, often padded)")

    def linear_widths(self, ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, int]:
        return {l.name: l.in_features for l in self.linears if not any(l.name.endswith(i) for i in ignore)}

    def group_size_problem(self, group_size: int, ignore: tuple[str, ...] = ("lm_head",)) -> list[str]:
        """Names of targeted layers whose input width the group size does not divide."""
        return [f"{n} ({w} wide)" for n, w in self.linear_widths(ignore).items() if w % group_size]


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def infer_spec(path: str | Path, trust_remote_code: bool = False) -> ModelSpec:
    """Shapes from the config on the meta device plus the tokenizer facts. A directory with a bad config.json or
    tokenizer raises ModelNotFound naming the file (`acf spec` and `acf run` reach the config first here)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = load_config(path, trust_remote_code)
    tok = load_tokenizer(path, trust_remote_code)
    qcfg = getattr(config, "quantization_config", None)
    qmethod = (qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linears = [LinearInfo(name=n, in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    emb_w = model.get_input_embeddings().weight
    emb = emb_w.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    if tied and out_emb is not None and out_emb.weight is not emb_w:
        params -= out_emb.weight.numel()  # meta init does not tie; a tied head is stored once
    lin_params = sum(l.in_features * l.out_features for l in linears)
    if tied:
        lin_params -= emb  # lm_head shares the embedding matrix
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", "")
    bpp = _DTYPE_BYTES.get(dtype, 2)
    widths = {l.name: l.in_features for l in linears if not l.name.endswith("lm_head")}
    valid, invalid = [], {}
    for g in GROUP_SIZE_CANDIDATES:
        bad = [n for n, w in widths.items() if w % g]
        if bad:
            invalid[g] = bad
        else:
            valid.append(g)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text_cfg.hidden_size
    n_layers = text_cfg.num_hidden_layers
    n_heads = getattr(text_cfg, "num_attention_heads", None)
    kv = getattr(text_cfg, "num_key_value_heads", n_heads)
    head_dim = getattr(text_cfg, "head_dim", None) or (hidden // n_heads if n_heads else None)
    # Estimate (not measured): weights + a 2048-token KV cache at batch 1, plus 10% framework overhead.
    kv_bytes = 2 * n_layers * (kv or 0) * (head_dim or 0) * 2048
    mem = {
        "bf16_inference": int((params * 2 + kv_bytes * 2) * 1.1),
        "fp32_inference": int((params * 4 + kv_bytes * 4) * 1.1),
        "bf16_weights": params * 2,
        "int4_weights_estimate": int(lin_params * 0.5 + (params - lin_params) * 2),
    }
    return ModelSpec(
        path=str(path), family=config.model_type, architecture=(config.architectures or [type(model).__name__])[0],
        params=params, linear_params=lin_params, embedding_params=emb, num_layers=n_layers, hidden_size=hidden,
        intermediate_size=getattr(text_cfg, "intermediate_size", None), num_heads=n_heads, num_kv_heads=kv,
        head_dim=head_dim, vocab_size=text_cfg.vocab_size, tied_embeddings=tied, dtype=dtype, bytes_per_param=bpp,
        linears=linears, valid_group_sizes=valid, invalid_group_sizes=invalid, memory_estimate_bytes=mem,
        quantized=qmethod, adds_bos=adds_bos(tok), bos_token=tok.bos_token, eos_token=tok.eos_token,
        chat_template=bool(getattr(tok, "chat_template", None)), tokenizer_vocab_size=len(tok),
    )


def spec_summary(spec: ModelSpec) -> dict:
    d = spec.model_dump(exclude={"linears"})
    d["invalid_group_sizes"] = {g: f"{len(v)} layers, e.g. {v[0]}" for g, v in spec.invalid_group_sizes.items()}
    widths: dict[int, int] = {}
    for l in spec.linears:
        widths[l.in_features] = widths.get(l.in_features, 0) + 1
    d["linear_in_widths"] = widths
    return d


def save_spec(spec: ModelSpec, path: str | Path) -> None:
    write_text(path, spec.model_dump_json(indent=2))


def load_spec(path: str | Path) -> ModelSpec:
    return ModelSpec.model_validate(json.loads(Path(path).read_text()))
