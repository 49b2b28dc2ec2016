"""llama.cpp's importance matrix statistic and its quantizer, for acf.methods.gguf's chain (see its docstring for why the
statistic is computed here and why the quantizer runs in a child process: `python -m acf.methods.gguf_quantize JOB`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from acf.models.gguf_file import GGUF_TYPES, GGUFError


# ---- importance matrix -----------------------------------------------------------------------------------------

def compute_imatrix(model, calib_ids, arch: str, n_layers: int, gguf_names: set[str]) -> tuple[dict[str, Any], dict]:
    """Mean squared input activation per input column of every Linear, keyed by GGUF tensor name.

    `calib_ids` is an (n, seq_len) LongTensor; returns (name -> float32 numpy vector, coverage facts)."""
    import gguf
    import numpy as np
    import torch

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise GGUFError(f"gguf-py has no tensor name map for architecture {arch!r}")
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names: dict[str, str] = {}
    unmapped: list[str] = []
    hooks = []
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for hf_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        g = tmap.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if (g is None or g not in gguf_names) and mod.weight is emb and "token_embd.weight" in gguf_names:
            g = "token_embd.weight"   # tied output: llama.cpp's output matmul uses token_embd, and so does imatrix
        if g is None or g not in gguf_names:
            unmapped.append(hf_name)
            continue
        names[hf_name] = g

        def hook(m, inp, _out, key=g):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            s = (x * x).sum(0)
            sums[key] = sums[key] + s if key in sums else s
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for row in calib_ids:
                model(input_ids=row[None].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    out = {k: (sums[k] / counts[k]).cpu().numpy().astype(np.float32) for k in sums}
    facts = {"tensors": len(out), "tokens": int(calib_ids.numel()), "unmapped_linears": unmapped,
             "statistic": "mean of squared input activations per column (llama-imatrix's sums/counts)"}
    return out, facts


# ---- llama.cpp's quantizer (child process) ----------------------------------------------------------------------

def quantize(src: Path, dst: Path, type_name: str, imatrix: Optional[dict[str, Any]], overrides: dict[str, str],
             nthread: int = 0) -> None:
    """`llama_model_quantize(src -> dst)` in a child process; the imatrix goes through a .npz file."""
    import numpy as np

    with tempfile.TemporaryDirectory() as td:
        job = {"src": str(src), "dst": str(dst), "ftype": GGUF_TYPES[type_name].ftype, "nthread": nthread,
               "overrides": {k: v.upper() for k, v in overrides.items()}, "imatrix": None}
        if imatrix:
            np.savez(Path(td) / "imatrix.npz", **imatrix)
            job["imatrix"] = str(Path(td) / "imatrix.npz")
        (Path(td) / "job.json").write_text(json.dumps(job))
        r = subprocess.run([sys.executable, "-m", "acf.methods.gguf_quantize", str(Path(td) / "job.json")],
                           capture_output=True, text=True, env=_child_env())
        print(r.stdout + r.stderr, flush=True)
    if r.returncode != 0 or not dst.is_file():
        raise GGUFError(f"llama.cpp's quantizer failed ({type_name}, exit {r.returncode}); see the step log")


def _child_env() -> dict[str, str]:
    """The child imports acf from wherever this process did (a checkout on PYTHONPATH, or the installed package)."""
    here = str(Path(__file__).resolve().parents[2])
    pp = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=here + (os.pathsep + pp if pp else ""))


def quantize_child(job_file: str) -> int:
    """Runs in the child: fill llama_model_quantize_params (imatrix and overrides as NULL-terminated C arrays)."""
    import ctypes

    import numpy as np
    import llama_cpp as L
    from gguf import GGMLQuantizationType

    job = json.loads(Path(job_file).read_text())
    p = L.llama_model_quantize_default_params()
    p.ftype = job["ftype"]
    p.nthread = int(job["nthread"])
    keep: list[Any] = []           # C strings and buffers must outlive the call
    if job["imatrix"]:
        data = dict(np.load(job["imatrix"]))
        arr = (L.llama_model_imatrix_data * (len(data) + 1))()
        for i, (k, v) in enumerate(data.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            name = k.encode()
            keep += [v, name]
            arr[i].name = name
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(data)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
    if job["overrides"]:
        ov = (L.llama_model_tensor_override * (len(job["overrides"]) + 1))()
        for i, (pat, tt) in enumerate(job["overrides"].items()):
            b = pat.encode()
            keep.append(b)
            ov[i].pattern = b
            ov[i].type = int(GGMLQuantizationType[tt])
        ov[len(job["overrides"])].pattern = None
        keep.append(ov)
        p.tt_overrides = ctypes.cast(ov, ctypes.POINTER(L.llama_model_tensor_override))
    rc = L.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(p))
    print(f"llama_model_quantize returned {rc}", flush=True)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(quantize_child(sys.argv[1]) if len(sys.argv) == 2 else 2)
