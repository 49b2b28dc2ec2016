#!/usr/bin/env python3
"""Copy a run directory without its model artifacts (what experiments/results/ keeps of a run);
the baseline reference cache (reference/) is left out too: it is recomputed from the baseline.

Kept: frontier.json, report.md and plots, run_config.json, model_spec.json, predictions, episodes/*/ (strategy,
result, step logs). Skipped: weights (*.safetensors, *.bin, *.pt, *.gguf), the SQLite databases and any file over
5 MB, so a GPU session can bring the run home through the device tool's file transfer.
    python tools/copy_run.py RUN_DIR DEST
"""

import shutil
import sys
from pathlib import Path

SKIP_SUFFIXES = {".safetensors", ".bin", ".pt", ".gguf", ".db", ".db-wal", ".db-shm"}
MAX_BYTES = 5 * 1024 * 1024


def main(src: str, dst: str) -> None:
    src_p, dst_p = Path(src), Path(dst)
    n = 0
    for f in sorted(src_p.rglob("*")):
        if not f.is_file() or f.suffix in SKIP_SUFFIXES or f.stat().st_size > MAX_BYTES:
            continue
        rel = f.relative_to(src_p)
        if rel.parts and rel.parts[0] in ("artifacts", "models", "work", "reference"):
            continue
        (dst_p / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst_p / rel)
        n += 1
    print(f"copied {n} files of {src_p} to {dst_p}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
