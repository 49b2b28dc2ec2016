"""What the registry records about a model folder without loading it: per-tensor content hashes of its safetensors
files (read from their headers and data, so two folders can be compared layer by layer) and size facts."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from acf.core.instruments import dir_size
from acf.models.gguf_file import GGUF_NAME, is_gguf_dir, read_gguf

#: bits per element of each safetensors dtype
ST_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
            "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")

def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def tensor_hashes(path: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (sha256 of dtype+shape+bytes, element count, bits) read straight from safetensors (no torch)."""
    out = {}
    for f in _safetensors_files(path):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            base = 8 + n
            for name, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
                if name == "__metadata__":
                    continue
                s, e = v["data_offsets"]
                fh.seek(base + s)
                h = hashlib.sha256(f"{v['dtype']}{v['shape']}".encode())
                left = e - s
                while left:
                    chunk = fh.read(min(left, 1 << 24))
                    h.update(chunk)
                    left -= len(chunk)
                cnt = 1
                for d in v["shape"]:
                    cnt *= d
                out[name] = (h.hexdigest(), cnt, cnt * ST_BITS.get(v["dtype"], 16))
    return out


def model_facts(path: Path) -> dict[str, Any]:
    """Parameters, size on disk, bits/weight, and a content hash per decoder layer (for shared-layer checks).

    A layer's hash covers its tensors' names relative to the layer, dtypes, shapes and bytes, so a block copied
    unchanged into a student (at any index) hashes the same as in its parent.
    """
    if is_gguf_dir(path):
        # GGUF: facts from its tensor table (no per-layer hashes: quantized blocks are compared by file hash)
        info = read_gguf(Path(path) / GGUF_NAME)
        return {"size_bytes": info.size_bytes, "params": info.params, "params_how": "GGUF tensor elements",
                "bits_per_weight": info.size_bytes * 8 / max(info.params, 1), "bits_how": "GGUF file bits / elements",
                "num_layers": len({n.split(".")[1] for n in info.widths if n.startswith("blk.")}), "layers": {},
                "other": {}}
    th = tensor_hashes(path)
    per_layer: dict[int, list[tuple[str, str]]] = {}
    other: dict[str, str] = {}
    for name, (h, _, _) in th.items():
        m = _LAYER.search(name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append((m.group(2), h))
        else:
            other[re.sub(r"^(base_model\.model\.)?(model\.)?", "", name)] = h
    layers = {i: hashlib.sha256(json.dumps(sorted(v)).encode()).hexdigest()[:16] for i, v in per_layer.items()}
    params = sum(c for _, c, _ in th.values())
    bits = sum(b for _, _, b in th.values())
    return {"size_bytes": _dir_size(path, dir_size), "params": params, "params_how": "safetensors header elements",
            "bits_per_weight": (bits / params) if params else None, "bits_how": "stored tensor bits / elements",
            "num_layers": len(layers), "layers": layers, "other": other}


def _dir_size(path: Path, fn) -> int:
    return fn(path) if path.exists() else 0
