#!/usr/bin/env python3
"""Entry point: `python run_pipeline.py --model X --dataset gsm8k --episodes N` (same as `acf run`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from acf.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "run", *sys.argv[1:]]
    main()
