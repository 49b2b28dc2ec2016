"""The baseline's reference distributions of a run, as a cache object: built once per item set from the uncompressed
model, stored on disk, reused by every candidate's kld/top1/kld_general and after a resume.

It lives in evaluation (not in the run's context) because it is a measurement's input: what a candidate is compared
against. The run only says where it is kept, which model is the baseline and which items each part covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from acf.evaluation.backend import Loaded
from acf.evaluation.fidelity import cached_reference
from acf.evaluation.shared import build_fidelity, eval_items
from acf.models.loading import load_tokenizer


class BaselineReferences:
    """Per item set ("search": the items that rank candidates; "report": the held-out items), the baseline's
    references (`evaluation.shared.Fidelity`), built on first use and cached under `folder` as safetensors (a corrupt
    or mismatched cache is named and rebuilt, never read as zeros)."""

    def __init__(self, baseline_path: str | Path, task: Any, folder: Path, *, device: str, seed: int,
                 item_range: Callable[[str], tuple[int, Optional[int]]], eval_batch_size: Optional[int] = None,
                 trust_remote_code: bool = False, say: Callable[[str], None] = lambda m: None):
        self.baseline_path, self.task, self.folder = str(baseline_path), task, Path(folder)
        self.device, self.seed, self.item_range = device, seed, item_range
        self.eval_batch_size, self.trust_remote_code, self.say = eval_batch_size, trust_remote_code, say
        self._parts: dict[str, Any] = {}

    def get(self, part: str = "search", loaded: Optional[Loaded] = None):
        """The references of one item set; `loaded`: the baseline already in memory (else it is loaded here, only
        when the disk cache cannot serve, and freed after)."""
        if part in self._parts:
            return self._parts[part]
        offset, limit = self.item_range(part)
        items = eval_items(self.task, limit, self.seed, offset)
        holder: dict[str, Loaded] = {}

        def model():
            if loaded is not None:
                return loaded.model
            if "m" not in holder:
                self.say(f"  [dim]loading the baseline to compute its reference distributions ({part} items)[/]")
                holder["m"] = Loaded.load(self.baseline_path, self.device, self.trust_remote_code)
            return holder["m"].model

        tok = loaded.tokenizer if loaded is not None else load_tokenizer(self.baseline_path, self.trust_remote_code)

        def cache(name, seqs, build):
            return cached_reference(self.folder / f"{name}.safetensors", seqs, build,
                                    say=lambda m: self.say(f"  [yellow]{m}[/]"))

        fid = build_fidelity(model, tok, self.task, items, general=True, general_part=part,
                             batch_size=self.eval_batch_size, model_name=self.baseline_path, cache=cache)
        if "m" in holder:
            holder["m"].free()
        self._parts[part] = fid
        return fid
