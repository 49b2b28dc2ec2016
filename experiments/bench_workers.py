#!/usr/bin/env python3
"""Episodes per hour with 1 worker, then with 2 (or --workers-list), sharing one study through Optuna's storage.

Each setting is a fresh study in a journal file (no database needed) run by `acf.distributed.run_coordinator`:
K local worker processes, one per visible GPU (CUDA_VISIBLE_DEVICES set per process), or K on CPU. The sampler is
`grid`, so every setting runs the same recipes in the same order and the comparison is about throughput, not about
which strategies the sampler happened to pick. Proxy pruning is off for the same reason.

Two rates are printed per setting:
  steady   episodes / (last trial completed - first trial started): the search itself, without process start-up
           and the one-off baseline evaluation;
  wall     episodes / whole wall time including start-up and the baseline.

    python experiments/bench_workers.py --episodes 8 --device cuda            # on the 2-GPU machine
    python experiments/bench_workers.py --model /tmp/tiny --episodes 4 --device cpu --limit 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def run_setting(args, k: int, out: Path) -> dict:
    import optuna
    from rich.console import Console

    from acf.distributed import make_storage, run_coordinator
    from acf.coordinator.run_context import RunConfig

    run_dir = out / f"workers-{k}"
    url = f"journal://{(out / f'study-{k}.log').resolve()}"
    cfg = RunConfig(model=args.model, dataset=args.dataset, run_dir=str(run_dir), episodes=args.episodes,
                    sampler="grid", objectives=args.objectives.split(","), limit=args.limit, proxy_limit=None,
                    min_retention=None, calib_samples=args.calib_samples, seq_len=args.seq_len,
                    latency_tokens=args.latency_tokens, device=args.device, storage=url, study_name=f"bench-{k}",
                    quant_methods=args.quant_methods.split(","), prune_methods=args.prune_methods.split(","),
                    recover_steps=[args.recover_steps], command=sys.argv)
    t0 = time.time()
    ff = run_coordinator(cfg, k, out / f"artifacts-{k}", Console(stderr=True), refresh_seconds=2)
    wall = time.time() - t0
    study = optuna.load_study(study_name=f"bench-{k}", storage=make_storage(url, heartbeat_interval=None))
    done = {c.trial_number for c in ff.candidates}
    trials = [t for t in study.get_trials() if t.number in done]
    first = min(t.datetime_start for t in trials)
    last = max(t.datetime_complete for t in trials)
    steady = (last - first).total_seconds()
    n = len(ff.candidates)
    return {"workers": k, "episodes": n, "statuses": [c.status for c in ff.candidates],
            "steady_seconds": round(steady, 1), "wall_seconds": round(wall, 1),
            "episodes_per_hour_steady": round(n / steady * 3600, 1) if steady > 0 else None,
            "episodes_per_hour_wall": round(n / wall * 3600, 1),
            "per_episode_seconds": {c.id: round(sum(c.timings.values()), 1) for c in ff.candidates},
            "device": ff.run.device_name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--workers-list", default="1,2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--objectives", default="answer_nll,size,latency")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--latency-tokens", type=int, default=16)
    ap.add_argument("--recover-steps", type=int, default=25)
    ap.add_argument("--quant-methods", default="none,gptq,rtn,w8a8,bnb_nf4,bnb_int8")
    ap.add_argument("--prune-methods", default="none,magnitude,wanda,sparsegpt,drop_layers")
    ap.add_argument("--out", type=Path, default=Path("runs") / f"bench-workers-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count()
        print(f"visible GPUs: {n} ({', '.join(torch.cuda.get_device_name(i) for i in range(n))})", flush=True)
    results = []
    for k in [int(x) for x in args.workers_list.split(",")]:
        print(f"\n=== {k} worker(s), {args.episodes} episodes ===", flush=True)
        r = run_setting(args, k, args.out)
        results.append(r)
        print(f"{k} worker(s): {r['episodes']} episodes, steady {r['steady_seconds']} s -> "
              f"{r['episodes_per_hour_steady']} episodes/hour (wall {r['wall_seconds']} s -> "
              f"{r['episodes_per_hour_wall']} episodes/hour)", flush=True)
    base = results[0]
    print("\nsummary")
    for r in results:
        ratio = (r["episodes_per_hour_steady"] / base["episodes_per_hour_steady"]
                 if r["episodes_per_hour_steady"] and base["episodes_per_hour_steady"] else None)
        ratio_w = r["episodes_per_hour_wall"] / base["episodes_per_hour_wall"]
        r["speedup_steady"] = round(ratio, 2) if ratio else None
        r["speedup_wall"] = round(ratio_w, 2)
        print(f"  workers={r['workers']}: {r['episodes_per_hour_steady']} episodes/hour steady "
              f"(x{r['speedup_steady']} vs {base['workers']}), {r['episodes_per_hour_wall']} wall (x{r['speedup_wall']})")
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    (args.out / "bench_workers.json").write_text(json.dumps(payload, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out / 'bench_workers.json'}")


if __name__ == "__main__":
    main()
