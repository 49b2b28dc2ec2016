"""Instruments that measure the process and the disk without knowing what is measured: peak memory a block of code
added, bytes of a directory and of its weight files. Read by evaluation (memory and size metrics) and by methods
(each step's record)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_files_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) + sum(
        p.stat().st_size for p in Path(path).glob("*.bin"))


class PeakRSS:
    """Samples the process RSS every few ms; `peak - start` is the memory a block added (CPU memory metric)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            r = self.proc.memory_info().rss
            if r > self.peak:
                self.peak = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        r = self.proc.memory_info().rss
        self.peak = max(self.peak, r)

    @property
    def added(self) -> int:
        return self.peak - self.start
