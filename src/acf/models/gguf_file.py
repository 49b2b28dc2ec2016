"""The GGUF file format as acf reads it: the candidate directory's names, llama.cpp's types and their block sizes
(which types a model's shapes admit), the header and tensor table of a file, the manifest beside it.

Read by models (`--model file.gguf`), evaluation (the llama.cpp back end), methods (the `gguf` export), search and
lifecycle; writing GGUF files (llama.cpp's converter and quantizer) stays in acf.methods.gguf. No torch, no llama.cpp:
gguf-py is imported only when a file is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from acf.core.atomic import read_json_strict
from acf.core.errors import AcfError

#: the file name of the model inside a GGUF candidate directory, and its manifest
GGUF_NAME = "model.gguf"
MANIFEST_NAME = "gguf.json"


class GGUFError(AcfError):
    """A GGUF file that cannot be used (not GGUF, truncated) or a GGUF tool that is missing."""


@dataclass(frozen=True)
class GGUFType:
    """A llama.cpp file type (`llama-quantize` TYPE): its ftype enum, main tensor type and block size."""

    name: str
    ftype: int          # llama_ftype
    block: int          # elements per block of the main tensor type: a row width must be a multiple of it
    fallback: str       # llama.cpp's type for a tensor whose row width the block does not divide
    bits: float         # nominal bits per weight of the main tensor type (scales included)


# llama_ftype values (llama.h) and block sizes (ggml QK*: 32 for legacy/IQ4_NL types, QK_K = 256 for k-quants and
# IQ4_XS). Fallbacks: llama-quant.cpp's `llama_tensor_get_type` for a row width that is not a multiple of QK_K.
GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in [
    GGUFType("F16", 1, 1, "F16", 16.0),
    GGUFType("BF16", 32, 1, "BF16", 16.0),
    GGUFType("Q8_0", 7, 32, "Q8_0", 8.5),
    GGUFType("Q6_K", 18, 256, "Q8_0", 6.5625),
    GGUFType("Q5_K_M", 17, 256, "Q5_1", 5.5),
    GGUFType("Q5_K_S", 16, 256, "Q5_1", 5.5),
    GGUFType("Q5_0", 8, 32, "Q5_0", 5.5),
    GGUFType("Q4_K_M", 15, 256, "Q5_0", 4.5),
    GGUFType("Q4_K_S", 14, 256, "Q5_0", 4.5),
    GGUFType("Q4_0", 2, 32, "Q4_0", 4.5),
    GGUFType("IQ4_XS", 30, 256, "IQ4_NL", 4.25),
    GGUFType("IQ4_NL", 25, 32, "IQ4_NL", 4.5),
    GGUFType("Q3_K_M", 12, 256, "IQ4_NL", 3.4375),
    GGUFType("Q2_K", 10, 256, "IQ4_NL", 2.625),
]}

#: ggml tensor types accepted in per-tensor overrides, with their block sizes
TENSOR_TYPES: dict[str, int] = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q6_K": 256, "Q5_K": 256, "Q5_0": 32,
                                "Q5_1": 32, "Q4_K": 256, "Q4_0": 32, "Q4_1": 32, "IQ4_XS": 256, "IQ4_NL": 32,
                                "Q3_K": 256, "Q2_K": 256}


def valid_types(widths: dict[str, int]) -> list[str]:
    """The types whose block size divides the input width of at least one quantized layer (see `type_problems`)."""
    return [n for n, t in GGUF_TYPES.items() if any(w % t.block == 0 for w in widths.values())]


def type_problems(type_name: str, widths: Optional[dict[str, int]], overrides: dict[str, str],
                  strict_shapes: bool = False) -> list[str]:
    """Why `type_name` (and the overrides) cannot be produced for a model with these Linear input widths.

    llama.cpp quantizes a tensor whose row width its block does not divide with a fallback type (e.g. Q4_K -> Q5_0
    for SmolLM2's 576-wide projections). A type that applies to no layer at all would name a file it is not, so it
    is refused; with `strict_shapes` any fallback is refused.
    """
    out = []
    t = GGUF_TYPES.get(type_name)
    if t is None:
        out.append(f"unknown GGUF type {type_name!r}; known: {', '.join(GGUF_TYPES)}")
    for pat, tt in overrides.items():
        if tt.upper() not in TENSOR_TYPES:
            out.append(f"override {pat!r}: unknown tensor type {tt!r}; known: {', '.join(TENSOR_TYPES)}")
        try:
            import re

            re.compile(pat)
        except re.error as e:
            out.append(f"override {pat!r} is not a regular expression ({e})")
    if t is None or not widths:
        return out
    bad = {n: w for n, w in widths.items() if w % t.block}
    if len(bad) == len(widths):
        out.append(f"type {type_name} needs row widths that are multiples of {t.block}, and no layer of this model "
                   f"has one ({', '.join(sorted({str(w) for w in widths.values()}))} wide); valid for this model: "
                   f"{', '.join(valid_types(widths)) or 'none'}")
    elif bad and strict_shapes:
        ex = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:3])
        out.append(f"type {type_name} (block {t.block}) does not divide {len(bad)} layer width(s), e.g. {ex}; "
                   f"llama.cpp would store them as {t.fallback} (strict_shapes=true refuses that); types valid for "
                   f"every layer: {', '.join(n for n, tt in GGUF_TYPES.items() if all(w % tt.block == 0 for w in widths.values()))}")
    return out


# ---- reading and checking files --------------------------------------------------------------------------------

class GGUFInfo(BaseModel):
    path: str
    size_bytes: int
    architecture: str
    file_type: Optional[int] = None
    tokenizer_model: Optional[str] = None       # tokenizer.ggml.model (gpt2, llama, ...)
    tokenizer_pre: Optional[str] = None         # tokenizer.ggml.pre (the pre-tokenizer llama.cpp applies)
    tensors: int
    params: int                      # logical elements of all tensors
    tensor_types: dict[str, int] = Field(default_factory=dict)      # type name -> tensor count
    type_params: dict[str, int] = Field(default_factory=dict)       # type name -> elements
    widths: dict[str, int] = Field(default_factory=dict)            # 2-D tensor name -> row width (ne0)


def read_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Header and tensor table of a GGUF file (gguf-py's reader, memory-mapped: no weights are read), or a
    GGUFError that says in one line what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(p))
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on a cut file
        raise GGUFError(f"{p}: unreadable GGUF (truncated or corrupt: {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    def field(key: str) -> Any:
        f = r.fields.get(key)
        return f.contents() if f is not None else None

    arch = field("general.architecture") or "?"
    ft = field("general.file_type")
    types: dict[str, int] = {}
    tparams: dict[str, int] = {}
    widths: dict[str, int] = {}
    total = 0
    end = 0
    for t in r.tensors:
        n = int(t.n_elements)
        total += n
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        tparams[name] = tparams.get(name, 0) + n
        if len(t.shape) == 2:
            widths[t.name] = int(t.shape[0])
        end = max(end, int(t.data_offset) + int(t.n_bytes))
    size = p.stat().st_size
    if end > size:
        raise GGUFError(f"{p}: truncated GGUF (tensor data ends at byte {end}, file has {size})")
    return GGUFInfo(path=str(p), size_bytes=size, architecture=arch, file_type=ft, tensors=len(r.tensors),
                    tokenizer_model=field("tokenizer.ggml.model"), tokenizer_pre=field("tokenizer.ggml.pre"),
                    params=total, tensor_types=types, type_params=tparams, widths=widths)


class GGUFManifest(BaseModel):
    """gguf.json beside model.gguf in a GGUF candidate directory: what made the file, checked on reading."""

    version: int = 1
    type: str
    source: str = ""                          # the HF directory it was exported from
    imatrix: Optional[dict[str, Any]] = None  # calibration facts and coverage, None without an imatrix
    overrides: dict[str, str] = Field(default_factory=dict)
    fallbacks: dict[str, str] = Field(default_factory=dict)   # tensor -> type llama.cpp chose instead
    info: GGUFInfo
    llama_cpp_python: str = ""
    sha256: str = ""


def is_gguf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / GGUF_NAME).is_file() and (p / MANIFEST_NAME).is_file()


def load_manifest(path: str | os.PathLike) -> GGUFManifest:
    return GGUFManifest.model_validate(read_json_strict(Path(path) / MANIFEST_NAME, "corrupt GGUF manifest",
                                                        GGUFError, unchanged=False))
