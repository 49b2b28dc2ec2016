"""The sensitivity passes' cache (`$ACF_CACHE/sensitivity/<key>.json`): keyed by the weights, the calibration
text and the estimator, written atomically, recomputed when corrupt; shared by the compressed-tensors
(acf.methods.mixed) and GGUF (acf.methods.gguf_mixed) allocations."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

from pydantic import BaseModel

from acf.core.atomic import sha256_file, write_text
from acf.methods.mixed import SENSITIVITY_VERSION


def sensitivity_key(weights_digest: str, task: str, n: int, seq_len: int, seed: int, formats: Sequence[str],
                    ignore: Sequence[str], general_samples: int = 0) -> str:
    """The cache key of a compressed-tensors sensitivity pass. `general_samples` (how many of the `n` windows are
    general text, `calibration.general_count`) joins the key only when non-zero: task-only keys stay as they were,
    so existing caches remain valid, and a mixed calibration never reads a task-only pass."""
    parts: list = [SENSITIVITY_VERSION, weights_digest, task, n, seq_len, seed, sorted(formats), sorted(ignore)]
    if general_samples:
        parts.append({"general_samples": general_samples})
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def weights_digest(model_dir: Path) -> str:
    """sha256 of the model's weight files: the cache key of a sensitivity pass (a pruned input gets its own)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    return hashlib.sha256(json.dumps([[p.name, sha256_file(p)] for p in files]).encode()).hexdigest()


class SensitivityCache(BaseModel):
    """What a sensitivity pass measured, cached per (weights, task, calibration, formats) and reused across episodes
    and runs (`$ACF_CACHE/sensitivity/<key>.json`)."""

    key: str
    estimator: str = SENSITIVITY_VERSION
    task: str
    calib_samples: int
    seq_len: int
    seconds: float
    scores: dict[str, dict[str, float]]


def cached_sensitivity(cache_dir: Path, key: str, compute: Callable[[], dict[str, dict[str, float]]], *, task: str,
                       n: int, seq_len: int) -> tuple[SensitivityCache, bool]:
    """Read the cached pass for `key`, or compute and write it atomically. A corrupt cache file is recomputed
    (and overwritten), never read as zeros. Returns (cache, hit)."""
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        try:
            c = SensitivityCache.model_validate_json(path.read_text())
            if c.key == key and c.scores:
                return c, True
        except ValueError:
            pass
    t = time.perf_counter()
    scores = compute()
    c = SensitivityCache(key=key, task=task, calib_samples=n, seq_len=seq_len,
                         seconds=round(time.perf_counter() - t, 3), scores=scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, c.model_dump_json())
    return c, False
