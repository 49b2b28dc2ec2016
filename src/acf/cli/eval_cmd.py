"""`acf eval`: one model on one task, optionally against a baseline (fidelity, the baseline's sanity check); its
options and printing. Registered on the `acf` app by acf.cli.main."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from acf.cli.console import console, err_console
from acf.core.errors import AcfError
from acf.core.logsetup import setup_logging


def eval_cmd(
    model: str = typer.Option("smollm2-135m"),
    dataset: str = typer.Option("gsm8k"),
    limit: Optional[int] = typer.Option(100),
    seed: int = typer.Option(0),
    metrics: str = typer.Option("answer_nll,accuracy,latency,memory,size,params,sparsity,bits_per_weight",
                                help="comma list; kld, top1 and kld_general need --baseline"),
    baseline: Optional[str] = typer.Option(None, help="the uncompressed model that kld/top1/kld_general compare "
                                           "against (alias, directory or hub id)"),
    fewshot: int = typer.Option(0, help="K-shot plain prompts instead of the zero-shot chat template"),
    batch_size: Optional[int] = typer.Option(None),
    max_new_tokens: int = typer.Option(256),
    device: Optional[str] = typer.Option(None),
    data_dir: Optional[Path] = typer.Option(None),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result (with per-item predictions) here"),
    backend: str = typer.Option("acf", help="acf | lm-eval"),
    allow_code_execution: bool = typer.Option(False, help="needed by tasks that execute model-written code"),
    trust_remote_code: bool = typer.Option(False),
    skip_sanity: bool = typer.Option(False, "--skip-sanity", help="do not run the sanity check (NLL on the task's "
                                     "text, repetition, characters per token) that warns about a broken model"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Measure a model on a task: quality (accuracy, answer NLL) and cost (latency, memory, size), with provenance."""
    from acf.evaluation import evaluate
    from acf.models.loading import resolve_device, resolve_model
    from acf.tasks import get_task

    setup_logging(verbose)
    if limit is not None and limit <= 0:
        raise AcfError(f"--limit must be a positive number of items (got {limit})")
    dev = resolve_device(device)
    task = get_task(dataset, str(data_dir) if data_dir else None)
    if hasattr(task, "allow_code_execution"):
        task.allow_code_execution = allow_code_execution
    path = resolve_model(model)
    sanity = lambda: _eval_sanity(path, model, task, limit, seed, dev, batch_size, trust_remote_code)  # noqa: E731
    if backend == "lm-eval":
        from acf.evaluation.lm_eval_bridge import run_lm_eval

        if not skip_sanity:
            try:
                task.load("test", limit=1)      # lm-eval may read hub data that acf's check cannot score
            except AcfError as e:
                err_console.print(f"[yellow]sanity check not run[/] (no local task text: {e})", soft_wrap=True)
            else:
                sanity().free()
        result = run_lm_eval(path, task, limit=limit, device=dev)
    elif backend == "acf":
        from acf.evaluation import check_metrics

        from acf.evaluation.runner import FIDELITY_METRICS

        mets = check_metrics(metrics.split(","), task)
        # Load data before the model so a data error costs nothing.
        task.load("test", limit=1)
        fid = None
        if any(m in FIDELITY_METRICS for m in mets):
            if baseline is None:
                raise AcfError(f"{', '.join(m for m in mets if m in FIDELITY_METRICS)} compare against the "
                               f"uncompressed model: pass --baseline MODEL")
            fid = _baseline_fidelity(resolve_model(baseline), task, limit, seed, dev, batch_size, trust_remote_code,
                                     general="kld_general" in mets)
        loaded = None if skip_sanity else sanity()     # the same check a run starts with, as a warning
        try:
            result = evaluate(path, task, mets, limit=limit, seed=seed, device=dev, batch_size=batch_size,
                              fewshot=fewshot, max_new_tokens=max_new_tokens, trust_remote_code=trust_remote_code,
                              fidelity=fid, loaded=loaded)
        finally:
            if loaded is not None:
                loaded.free()
    else:
        raise AcfError(f"unknown backend {backend!r}: acf or lm-eval")
    _print_metrics(result.metrics, f"{model} on {task.name}")
    if json_out:
        from acf.core.atomic import write_text

        write_text(json_out, result.model_dump_json(indent=2))
        console.print(f"wrote {json_out}")


def _eval_sanity(path: Path, name: str, task, limit, seed, device, batch_size, trust_remote_code):
    """`acf eval`'s sanity check (acf.evaluation.sanity, as a run starts with): a warning per problem on stderr, not a stop,
    since measuring an odd model may be the point. Returns the loaded model, which the evaluation reuses."""
    from acf.evaluation.runner import Loaded, eval_items
    from acf.evaluation.sanity import SANITY_ITEMS, check_baseline, summary

    ld = Loaded.load(path, device, trust_remote_code)
    try:
        items = eval_items(task, min(SANITY_ITEMS, limit or SANITY_ITEMS), seed)
        rep = check_baseline(ld.model, ld.tokenizer, task, items, device, batch_size=batch_size, model_name=name)
    except BaseException:
        ld.free()
        raise
    if rep.ok:
        console.print(f"[dim]{summary(rep)}[/]")
    for p in rep.problems:
        err_console.print(f"[yellow]warning:[/] {name} looks broken: {p}", soft_wrap=True)
    return ld


def _baseline_fidelity(base_path: Path, task, limit, seed, device, batch_size, trust_remote_code, general: bool):
    """The baseline's reference distributions for `acf eval --baseline` (computed now, not cached)."""
    from acf.evaluation.runner import Loaded, build_fidelity, eval_items

    ld = Loaded.load(base_path, device, trust_remote_code)
    try:
        return build_fidelity(ld.model, ld.tokenizer, task, eval_items(task, limit, seed), general=general,
                              batch_size=batch_size, model_name=str(base_path))
    finally:
        ld.free()


def _print_metrics(metrics: dict, title: str) -> None:
    t = Table(title=title)
    for c in ("metric", "value", "unit", "95% CI", "n", "how / device"):
        t.add_column(c)
    for k, m in metrics.items():
        v = m.value
        vs = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) and abs(v) < 1000 else f"{v:,.0f}")
        ci = f"[{m.ci95[0]:.3f}, {m.ci95[1]:.3f}]" if m.ci95 else ""
        t.add_row(k, vs, m.unit, ci, "" if m.n is None else str(m.n), f"{m.how}, {m.device}")
    console.print(t)
