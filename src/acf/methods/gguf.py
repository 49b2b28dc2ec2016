"""GGUF: export an HF model directory to llama.cpp's format, quantize it with llama.cpp's own quantizer, check files.

The chain is llama.cpp's, end to end, at the commit of the llama.cpp that measures the result:

1. `convert_hf_to_gguf.py` (llama.cpp's converter, from the llama-cpp-python source distribution that built the
   runtime: the wheel ships only the library, so `python -m acf.methods.gguf install-converter` — run by `make
   install` — unpacks the converter, its `conversion/` package and its `gguf-py` next to the venv) writes an F16 GGUF;
2. `llama_model_quantize` (llama.cpp's quantizer, bound by llama-cpp-python) writes the chosen type, taking an
   importance matrix and per-tensor type overrides through the C structs `llama_model_imatrix_data` and
   `llama_model_tensor_override` of `llama_model_quantize_params`.

What is written by hand here, and why:
- the importance matrix statistic. llama.cpp's `llama-imatrix` tool is not built by any package installable from
  PyPI here (llama-cpp-python builds the library only). Its statistic is simple and documented: for every matmul
  weight, the mean over calibration tokens of the squared input activation of each input column
  (`tools/imatrix`: sums of x^2 / counts; `tools/quantize` hands `sums / count` to the quantizer). It is computed
  with forward hooks on the HF model's Linear layers, on the same calibration windows GPTQ/AWQ use
  (`acf.methods.calibration.calibration_ids`: train split, evaluation's prompt format), and mapped to GGUF tensor
  names with gguf-py's `TensorNameMap`.
- validation of a type against the model's shapes (a table of llama.cpp's block sizes): so a strategy that cannot
  produce the type it names fails before anything runs.

Quantization runs in a child process (acf.methods.gguf_quantize): llama.cpp aborts the whole process on some internal
errors (GGML_ABORT), which must fail one step, not the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from acf.core.errors import AcfError

#: the file name of the model inside a GGUF candidate directory, and its manifest
GGUF_NAME = "model.gguf"
MANIFEST_NAME = "gguf.json"
LLAMA_CPP_PYTHON = "llama-cpp-python"


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


# ---- llama.cpp's converter ------------------------------------------------------------------------------------

def _llama_cpp_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # not installed
        return None


def converter_root() -> Path:
    """Where llama.cpp's converter for the installed llama-cpp-python lives (ACF_LLAMA_CPP_CONVERTER overrides)."""
    env = os.environ.get("ACF_LLAMA_CPP_CONVERTER")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "acf" / f"llama.cpp-convert-{_llama_cpp_version() or 'none'}"


def require_llama_cpp() -> str:
    v = _llama_cpp_version()
    if v is None:
        raise GGUFError("llama-cpp-python is not installed (it builds llama.cpp from source: `make install`, or "
                        "pip install llama-cpp-python==0.3.36)")
    return v


def require_converter() -> Path:
    root = converter_root()
    if not (root / "convert_hf_to_gguf.py").is_file():
        raise GGUFError(f"llama.cpp's converter is not installed at {root}: run `python -m acf.methods.gguf "
                        f"install-converter` (part of `make install`)")
    return root


def install_converter(sdist: Optional[Path] = None) -> Path:
    """Unpack convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist of the installed
    version (downloaded with pip, which caches it) into `converter_root()`, atomically."""
    from acf.core.atomic import atomic_dir

    v = require_llama_cpp()
    root = converter_root()
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as td:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"{LLAMA_CPP_PYTHON}=={v}", "-d", td], check=True)
            sdist = next(Path(td).glob("*.tar.gz"))
        keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/",
                "vendor/llama.cpp/LICENSE")
        root.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf, atomic_dir(root) as tmp:
            for m in tf.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if not rel.startswith(keep) or not (m.isfile() or m.isdir()):
                    continue
                dest = tmp / rel[len("vendor/llama.cpp/"):]
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(m)
                assert src is not None
                dest.write_bytes(src.read())
            (tmp / "SOURCE").write_text(f"{LLAMA_CPP_PYTHON} {v} sdist, vendor/llama.cpp\n")
    return root


def _is_byte_level(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(_is_byte_level(p) for p in pre.get("pretokenizers", []))


def staged_for_conversion(in_dir: Path, stage: Path) -> Path:
    """`in_dir` as the converter should see it: the same files (symlinked), with one correction to tokenizer.json.

    transformers' GGUF import (how acf gets its default model) writes a byte-level BPE tokenizer with
    `byte_fallback: true`. A byte-level BPE never falls back (every byte has its own token), so the flag changes no
    tokenization in transformers; but llama.cpp's converter reads it as a SentencePiece-style Llama vocabulary and
    writes `tokenizer.ggml.model = llama`, with which llama.cpp would tokenize text wrongly. With the flag off the
    converter recognises the pre-tokenizer (SmolLM2: `gpt2` / `smollm`, as in the wheel's original GGUF)."""
    tj = in_dir / "tokenizer.json"
    try:
        tok = json.loads(tj.read_text(encoding="utf-8")) if tj.is_file() else None
    except (OSError, ValueError):
        tok = None
    model = (tok or {}).get("model") or {}
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and _is_byte_level(tok.get("pre_tokenizer"))):
        return in_dir
    stage.mkdir(parents=True, exist_ok=True)
    for f in in_dir.iterdir():
        if f.name != "tokenizer.json":
            (stage / f.name).symlink_to(f.resolve())
    model["byte_fallback"] = False
    (stage / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return stage


def convert_hf(in_dir: Path, out_file: Path, outtype: str = "f16") -> None:
    """llama.cpp's converter in a child process: HF directory -> GGUF (`outtype` f16, bf16 or f32)."""
    root = require_converter()
    in_dir = staged_for_conversion(in_dir, out_file.parent / (out_file.name + ".src"))
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py") + os.pathsep + str(root), NO_LOCAL_GGUF="")
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(in_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # printed, not logged: a method step redirects stdout into its own log file (acf.methods.runner)
    print(r.stdout + r.stderr, flush=True)
    if r.returncode != 0 or not out_file.is_file():
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise GGUFError(f"llama.cpp's converter failed on {in_dir}: {tail[0][:400]}")


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
    from acf.core.atomic import read_json_strict

    return GGUFManifest.model_validate(read_json_strict(Path(path) / MANIFEST_NAME, "corrupt GGUF manifest",
                                                        GGUFError, unchanged=False))


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install-converter"]:
        root = install_converter(Path(argv[1]) if len(argv) > 1 else None)
        print(root)
        return 0
    print("usage: python -m acf.methods.gguf install-converter [SDIST]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
