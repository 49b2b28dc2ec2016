"""A progress line for a long compression step, on the terminal while the step's own output goes to its log.

The libraries' own bars and per-layer lines (llm-compressor's sequential pipeline: "Quantizing 1 module(s):
['model.layers.14.mlp.up_proj']", AutoRound's "Applying AutoRound on layer model.layers.14") go to the step log
(acf.methods.run_steps), so without this a GPTQ step on a CPU ran 8-20 minutes with nothing on the terminal. No
library exposes a progress callback for these steps, so the decoder block being worked on is read off that output
(written by hand for that reason): "gptq · block 14/30 · 1m 23s". On a terminal the line is redrawn in place every
second and cleared at the end; elsewhere (CI, a pipe) one line every `ACF_PROGRESS_SECONDS` (default 60). Nothing is
shown for a step that ends within the first `quiet` seconds.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

#: a decoder block named in a library's output (HF Llama/Qwen/Gemma/Mistral: model.layers.N; GPT-2/Falcon: h.N)
BLOCK = re.compile(r"(?:model\.layers|transformer\.h|model\.decoder\.layers)\.(\d+)\b")


def num_blocks(model_dir: Path) -> Optional[int]:
    """The decoder block count from the model's config.json (text_config for multimodal configs), or None."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        n = c.get("num_hidden_layers") or c.get("n_layer")
        if isinstance(n, int) and n > 0:
            return n
    return None


def elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class StepProgress:
    """Watches a step's output for the block in progress (`feed`) and shows it on `out` from a daemon thread."""

    def __init__(self, method: str, blocks: Optional[int], out: TextIO, *, quiet: float = 20.0,
                 every: Optional[float] = None):
        self.method, self.blocks, self.out, self.quiet = method, blocks, out, quiet
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.every = every if every is not None else (1.0 if self.tty else
                                                      float(os.environ.get("ACF_PROGRESS_SECONDS", "60")))
        self.block: Optional[int] = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._drawn = False

    def feed(self, text: str) -> None:
        """Called with every piece of the step's output; keeps the highest block index seen."""
        for m in BLOCK.finditer(text):
            k = int(m.group(1))
            if self.block is None or k > self.block:
                self.block = k

    def line(self) -> str:
        where = ""
        if self.block is not None:
            where = f" · block {self.block + 1}/{self.blocks}" if self.blocks else f" · block {self.block + 1}"
        return f"  {self.method}{where} · {elapsed(time.monotonic() - self.t0)}"

    def _run(self) -> None:
        if self._stop.wait(self.quiet):
            return
        while True:
            try:
                if self.tty:
                    self.out.write("\r\033[K" + self.line())
                else:
                    self.out.write(self.line() + "\n")
                self.out.flush()
                self._drawn = True
            except (OSError, ValueError):   # the terminal went away: stop showing, never fail the step
                return
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "StepProgress":
        self._thread = threading.Thread(target=self._run, name=f"acf-progress-{self.method}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._drawn and self.tty:
            try:
                self.out.write("\r\033[K")
                self.out.flush()
            except (OSError, ValueError):
                pass
