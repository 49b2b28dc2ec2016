"""Starting local worker processes (`acf worker`, one per visible GPU or K on CPU) and stopping them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def spawn_workers(k: int, url: str, study: str, device: str, run_dir: str | Path, artifacts: Path, heartbeat: int,
                  grace: int, console, extra: Optional[list[str]] = None) -> list[subprocess.Popen]:
    """K local worker processes: one per visible GPU (CUDA_VISIBLE_DEVICES each), or K on CPU. Each logs to
    RUN_DIR/workers/worker-I.log."""
    procs: list[subprocess.Popen] = []
    gpus: list[str] = []
    if device.startswith("cuda"):
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        if vis:
            gpus = [g for g in vis.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
    logs = Path(run_dir) / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2])
    for i in range(k):
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # Each worker gets its share of the CPU cores, GPU workers too: their host-side work (calibration
        # data, compressed-tensors packing, saving, tokenising) otherwise runs K x all-cores thread pools on
        # one host. Measured on 2 H200s without this: 2 workers ran each episode 1.2x slower than 1 worker.
        threads = max(1, (os.cpu_count() or 1) // k)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env.setdefault("MKL_NUM_THREADS", str(threads))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            wdev = "cuda:0"
        else:
            wdev = "cpu"
        cmd = [sys.executable, "-m", "acf.cli.main", "worker", "--storage", url, "--study", study, "--device", wdev,
               "--artifacts", str(artifacts), "--heartbeat-interval", str(heartbeat), "--grace-period", str(grace),
               *(extra or [])]
        f = open(logs / f"worker-{i}.log", "ab")
        procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        f.close()
    if k:
        console.print(f"started {k} worker(s) on {device}" + (f" (GPUs {', '.join(gpus)})" if gpus else "")
                      + f"; logs in {logs}")
    return procs


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """Terminate the processes still running; kill those that do not exit within 30 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
