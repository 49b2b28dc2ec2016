"""The default model's figures on every task, on this machine, with provenance.

    ACF_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1 .venv/bin/python experiments/bench_tasks.py \
        [--limit 200] [--bbh-limit 2] [--humaneval-limit 20] [--gsm8k-limit 30] [--tasks ...] [--no-reference]
        [--no-lm-eval]

Writes experiments/results/tasks-cpu.json and .md. Items: the first `limit` items of each task's evaluated split
in file order (seed None), so that figures are comparable with lm-eval (which takes the first items) and with
the issue's unbatched CommonsenseQA measurement (first 200 dev items).

Besides acf's own figures it measures (a) an unbatched reference scorer on the same CommonsenseQA items (one
forward per prompt+choice, full logits, as in the issue) in the same process, so the speed-up is taken under the
same machine load, and (b) lm-evaluation-harness on the same CommonsenseQA and GSM8K items.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def unbatched_reference(model, tok, task, items) -> dict:
    """The issue's baseline: every (prompt + choice) alone through the model, full logits, sum and per-char."""
    t0 = time.perf_counter()
    k = kn = 0
    for it in items:
        ctx = task.context(it)
        p = tok(ctx, add_special_tokens=False)["input_ids"]
        best = best_n = None
        for j, c in enumerate(task.continuations(it)):
            whole = tok(ctx + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(p):]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            lp = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, torch.tensor(cont)[:, None]).sum().item()
            if best is None or lp > best[0]:
                best = (lp, j)
            if best_n is None or lp / len(c.lstrip()) > best_n[0]:
                best_n = (lp / len(c.lstrip()), j)
        k += best[1] == it.target
        kn += best_n[1] == it.target
    n = len(items)
    return {"accuracy": k / n, "accuracy_norm": kn / n, "n": n, "seconds": round(time.perf_counter() - t0, 2),
            "method": "unbatched reference: one forward per prompt+choice, full-vocabulary logits at every position"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--bbh-limit", type=int, default=2, help="items per BBH task (27 tasks)")
    ap.add_argument("--humaneval-limit", type=int, default=20)
    ap.add_argument("--gsm8k-limit", type=int, default=30, help="items for the acf vs lm-eval GSM8K check")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", default="commonsenseqa,truthfulqa,bbh,humaneval,gsm8k")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a CPU shared with other work, 1 avoids OpenMP barrier thrashing")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-lm-eval", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "tasks-cpu"))
    a = ap.parse_args()

    from acf.evaluation import evaluate
    from acf.models.loading import load_model, resolve_model
    from acf.core.provenance import device_string, git_commit, runtime_string
    from acf.tasks import get_task

    torch.set_num_threads(a.threads)
    model_dir = resolve_model("smollm2-135m")
    model, tok = load_model(model_dir)
    report: dict = {"model": "smollm2-135m (SmolLM2-135M-Instruct, float32)", "device": device_string("cpu"),
                    "runtime": runtime_string(), "platform": platform.platform(), "git": git_commit(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "tasks": {}, "checks": {}}
    try:
        import importlib.metadata as md

        report["lm_eval"] = md.version("lm_eval")
    except Exception:
        report["lm_eval"] = None
    wanted = [t.strip() for t in a.tasks.split(",") if t.strip()]

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".json").write_text(json.dumps(report, indent=2, default=str))
        Path(a.out + ".md").write_text(markdown(report))

    def run(name: str, metrics: list[str], limit: int, **task_kw):
        task = get_task(name, **task_kw)
        print(f"== {name}: {metrics}, limit {limit}", flush=True)
        res = evaluate(model_dir, task, metrics, limit=limit, seed=None, batch_size=a.batch_size,
                       show_progress=False, loaded=(model, tok))
        report["tasks"][name] = {"limit": limit, "metrics": {k: v.model_dump() for k, v in res.metrics.items()},
                                 "seconds": res.seconds}
        for k, v in res.metrics.items():
            print(f"   {k} = {v.value:.4f} ci95={v.ci95} n={v.n} {v.seconds}s", flush=True)
        save()
        return task, res

    if "commonsenseqa" in wanted:
        task, res = run("commonsenseqa", ["accuracy", "accuracy_norm", "answer_nll"], a.limit)
        if not a.no_reference:
            items = task.load("test", limit=a.limit, seed=None)
            print("== unbatched reference on the same items", flush=True)
            ref = unbatched_reference(model, tok, task, items)
            ours = res.metrics["accuracy"].seconds
            report["checks"]["commonsenseqa_speed"] = {
                "reference": ref, "batched_seconds": ours, "speedup": round(ref["seconds"] / ours, 2),
                "same_predictions": abs(ref["accuracy"] - res.value("accuracy")) < 1e-9}
            print(f"   reference {ref}\n   speed-up x{ref['seconds'] / ours:.1f}", flush=True)
            save()
        if not a.no_lm_eval and report["lm_eval"]:
            from acf.evaluation.lm_eval_bridge import run_lm_eval

            print("== lm-eval commonsenseqa", flush=True)
            le = run_lm_eval(model_dir, "commonsenseqa", limit=a.limit, batch_size=a.batch_size)
            report["checks"]["commonsenseqa_lm_eval"] = {
                "lm_eval": {k: v.model_dump() for k, v in le.metrics.items()},
                "acf": {k: res.value(k) for k in ("accuracy", "accuracy_norm")}}
            print(f"   lm-eval {({k: v.value for k, v in le.metrics.items()})} vs acf "
                  f"{report['checks']['commonsenseqa_lm_eval']['acf']}", flush=True)
            save()
    if "truthfulqa" in wanted:
        run("truthfulqa", ["mc1", "mc2", "answer_nll"], a.limit)
    if "gsm8k" in wanted and not a.no_lm_eval and report["lm_eval"]:
        from acf.evaluation.lm_eval_bridge import run_lm_eval

        _, res = run("gsm8k", ["accuracy"], a.gsm8k_limit)
        print("== lm-eval gsm8k", flush=True)
        le = run_lm_eval(model_dir, "gsm8k", limit=a.gsm8k_limit, batch_size=a.batch_size)
        acc = le.metrics.get("accuracy")
        report["checks"]["gsm8k_lm_eval"] = {
            "lm_eval": {k: v.model_dump() for k, v in le.metrics.items()}, "acf": res.metrics["accuracy"].model_dump(),
            "within_interval": bool(acc and res.metrics["accuracy"].ci95[0] <= acc.value <= res.metrics["accuracy"].ci95[1]),
            "note": "weak check: the model scores near 0 on GSM8K, so both intervals are wide"}
        print(f"   lm-eval {acc.value if acc else None} vs acf {res.value('accuracy')}", flush=True)
        save()
    if "humaneval" in wanted:
        run("humaneval", ["pass@1"], a.humaneval_limit, allow_code_execution=True)
    if "bbh" in wanted:
        run("bbh", ["accuracy", "answer_nll"], a.bbh_limit)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(f"wrote {a.out}.json and .md", flush=True)


def markdown(r: dict) -> str:
    lines = [f"# Task figures: {r['model']}", "", f"- device: {r['device']}", f"- runtime: {r['runtime']}, lm-eval {r.get('lm_eval')}",
             f"- git: {r.get('git')}; started {r.get('started')}, finished {r.get('finished', '(running)')}",
             "- items: the first N of each task's evaluated split, in file order", "",
             "| task | metric | value | 95% CI | n | seconds | method |", "|---|---|---|---|---|---|---|"]
    for t, d in r["tasks"].items():
        for k, m in d["metrics"].items():
            ci = "" if not m.get("ci95") else f"{m['ci95'][0]:.3f}–{m['ci95'][1]:.3f}"
            v = m["value"]
            lines.append(f"| {t} | {k} | {v:.4f} | {ci} | {m.get('n')} | {m.get('seconds')} | {m.get('method')} |"
                         if v is not None else f"| {t} | {k} | n/a | | | | |")
    if r["checks"]:
        lines += ["", "## Checks", "", "```json", json.dumps(r["checks"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
