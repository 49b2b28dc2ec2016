"""The consoles every `acf` command prints through."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped into a log, rich would wrap tables at 80 columns (strategies then take a dozen lines each).
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)
