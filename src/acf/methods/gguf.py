"""GGUF: export an HF model directory to llama.cpp's format, quantize it with llama.cpp's own quantizer (the file
format itself, reading and checking files: acf.models.gguf_file).

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
- validation of a type against the model's shapes (a table of llama.cpp's block sizes, in acf.models.gguf_file with
  the reader of GGUF files): so a strategy that cannot produce the type it names fails before anything runs.

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
from pathlib import Path
from typing import Any, Optional

from acf.core.atomic import atomic_dir
from acf.models.gguf_file import GGUFError

LLAMA_CPP_PYTHON = "llama-cpp-python"


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
    # printed, not logged: a method step redirects stdout into its own log file (acf.methods.run_steps)
    print(r.stdout + r.stderr, flush=True)
    if r.returncode != 0 or not out_file.is_file():
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise GGUFError(f"llama.cpp's converter failed on {in_dir}: {tail[0][:400]}")


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
