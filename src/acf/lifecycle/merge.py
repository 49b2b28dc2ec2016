"""`acf merge`: a peft LoRA adapter merged into its base, saved as a plain HF folder any loader reads.

An adapter alone needs peft and the exact base at load time; merged (peft's `merge_and_unload`, as the `lora`
method and the adapter loop's GGUF deploy do) it is an ordinary checkpoint that transformers, llama.cpp's
converter or vLLM read without peft. The merge runs in float32 on the CPU (a bf16 merge would round the small
LoRA delta), and the result is saved in the base's stored dtype, so its size is the base's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from acf.core.atomic import atomic_dir, make_readable
from acf.core.errors import AcfError
from acf.models.loading import free, resolve_model


def adapter_base(adapter_dir: Path) -> Optional[str]:
    """The base the adapter names in its adapter_config.json (acf's own adapters name none: their base was a
    step's temporary input)."""
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError):
        return None


def merge_adapter(adapter_dir: str | Path, base: Optional[str], out: str | Path, *, force: bool = False,
                  trust_remote_code: bool = False, dtype=None) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into `base` (alias, folder or hub id; default: the base the adapter
    names) and save the merged model and the base's tokenizer into `out` atomically. `dtype`: the saved dtype
    (default: the base's stored one). Returns `out`."""
    import torch

    from acf.methods.model_io import load_dense, save_model, stored_dtype

    adapter_dir, out = Path(adapter_dir).expanduser(), Path(out).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AcfError(f"{adapter_dir}: no adapter_config.json, so not a peft adapter folder")
    base = base or adapter_base(adapter_dir)
    if not base:
        raise AcfError(f"{adapter_dir}: the adapter names no base model; pass --base MODEL")
    if out.exists() and not out.is_dir():
        raise AcfError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AcfError(f"--out {out} exists and is not empty: choose a new folder, or --force to replace it")
    base_dir = resolve_model(base)
    if out.resolve() in (base_dir.resolve(), adapter_dir.resolve()):
        raise AcfError(f"--out {out}: is the base or the adapter folder itself; choose another")
    model, tok = load_dense(base_dir, "cpu", "merge", dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        from peft import PeftModel

        try:
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as e:   # shape mismatch, unknown modules, not a LoRA adapter
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AcfError(f"{adapter_dir} does not merge into {base}: {first}") from None
        with atomic_dir(out.resolve()) as tmp:
            save_model(merged, tok, tmp, dtype=dtype or stored_dtype(base_dir))
            make_readable(tmp)
    finally:
        free(model)
    return out.resolve()
