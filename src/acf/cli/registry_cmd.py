"""`acf registry ...`: register, list, show, compare, promote, roll back and prune model artifacts."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from acf.core.errors import AcfError
from acf.lifecycle.registry import Entry, open_registry

registry_app = typer.Typer(help="Model registry: lineage, metrics, promotion and rollback of artifacts.",
                           no_args_is_help=True, add_completion=False)
console = Console()
_META = "acf.registry_path"


def cli_errors(fn: Callable) -> Callable:
    """Show an AcfError as one line on stderr with exit code 2 (no traceback): the user can fix it.

    SystemExit rather than typer.Exit: `acf` runs click with standalone_mode=False, where Exit only returns.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AcfError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _path(ctx: typer.Context) -> Optional[Path]:
    return ctx.meta.get(_META)


@registry_app.callback()
def _registry_main(ctx: typer.Context, registry: Optional[Path] = typer.Option(
        None, "--registry", envvar="ACF_REGISTRY",
        help="registry JSON file (default: $ACF_HOME/registry.json, ACF_HOME defaults to ~/.acf)")) -> None:
    ctx.meta[_META] = registry


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _metric_str(e: Entry, names=("accuracy", "answer_nll", "size", "latency")) -> str:
    return ", ".join(f"{m}={_fmt(e.value(m))}" for m in names if m in e.metrics)


@registry_app.command("add")
@cli_errors
def add(ctx: typer.Context,
        run_dir: Path = typer.Argument(..., help="run directory holding frontier.json"),
        candidate_id: str = typer.Argument(..., help="candidate id, or 'recommended' for the run's pick"),
        tag: list[str] = typer.Option([], "--tag", help="tag to attach (repeatable)")) -> None:
    """Register a run's candidate, and its base model as parent if it is not registered yet."""
    with open_registry(_path(ctx), create=True) as reg:
        e, base_new = reg.add_from_run(run_dir, candidate_id, tags=tag)
        if base_new is not None:
            console.print(f"registered base model [bold]{base_new.id}[/] ({base_new.name}, {base_new.path})")
        console.print(f"registered {e.kind} [bold]{e.id}[/] ({e.name}) parent={e.parent} in {reg.path}")


@registry_app.command("add-model")
@cli_errors
def add_model(ctx: typer.Context,
              path: Path = typer.Argument(..., help="model or adapter directory"),
              kind: str = typer.Option(..., "--kind", help="base | compressed | adapter | student"),
              parent: Optional[str] = typer.Option(None, "--parent", help="parent entry id (required unless base)"),
              name: Optional[str] = typer.Option(None, "--name"),
              metrics: Optional[Path] = typer.Option(None, "--metrics", help="JSON: acf eval output or {metric: "
                                                     "Measurement}; size on disk is always measured"),
              tag: list[str] = typer.Option([], "--tag")) -> None:
    """Register a model directory that did not come from a run (a base model, an external checkpoint)."""
    from acf.core.provenance import Measurement

    ms = {}
    if metrics is not None:
        try:
            raw = json.loads(metrics.read_text())
            raw = raw.get("metrics", raw)
            ms = {k: Measurement.model_validate(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise typer.BadParameter(f"{metrics}: not a metrics JSON ({type(e).__name__}: {e})") from None
    with open_registry(_path(ctx), create=True) as reg:
        e, created = reg.add_entry(kind=kind, path=path, name=name, parent=parent, metrics=ms, tags=tag)
        console.print(f"{'registered' if created else 'already registered as'} {e.kind} [bold]{e.id}[/] ({e.path})")


@registry_app.command("list")
@cli_errors
def list_cmd(ctx: typer.Context,
             kind: Optional[str] = typer.Option(None, "--kind"),
             base: Optional[str] = typer.Option(None, "--base", help="entries derived from this base model (id/name)"),
             method: Optional[str] = typer.Option(None, "--method", help="strategy contains this method"),
             bits: Optional[int] = typer.Option(None, "--bits", help="a strategy step uses this many bits"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """List entries (filters combine)."""
    with open_registry(_path(ctx), write=False) as reg:
        rows = reg.list(kind=kind, base=base, method=method, bits=bits)
    if as_json:
        typer.echo(json.dumps([e.model_dump() for e in rows], indent=2, default=str))
        return
    t = Table(Column("id", no_wrap=True), "active", "kind", "name", "parent", "strategy", "metrics", "created")
    for e in rows:
        t.add_row(e.id, "*" if e.active else ("rolled back" if e.rolled_back else ""), e.kind, e.name,
                  e.parent or "–", e.strategy.describe() if e.strategy else "–", _metric_str(e), e.created_at)
    console.print(t)


@registry_app.command("show")
@cli_errors
def show(ctx: typer.Context, entry_id: str = typer.Argument(..., help="id, name, unique id prefix or 'active'")) -> None:
    """Everything recorded about one entry (JSON)."""
    with open_registry(_path(ctx), write=False) as reg:
        e = reg.get(entry_id)
    typer.echo(e.model_dump_json(indent=2))


@registry_app.command("compare")
@cli_errors
def compare(ctx: typer.Context, a: str = typer.Argument(...), b: str = typer.Argument(...),
            as_json: bool = typer.Option(False, "--json")) -> None:
    """Parameters, size, bits/weight, decoder layers shared (by index and by weight hash), metric deltas."""
    with open_registry(_path(ctx), write=False) as reg:
        r = reg.compare(a, b)
    if as_json:
        typer.echo(json.dumps(r, indent=2, default=str))
        return
    t = Table("", f"a: {r['a']['id']}", f"b: {r['b']['id']}")
    for k, label in (("name", "name"), ("kind", "kind"), ("parent", "parent"), ("params", "parameters"),
                     ("size_bytes", "size on disk (bytes)"), ("bits_per_weight", "bits/weight"),
                     ("num_layers", "decoder layers")):
        t.add_row(label, _fmt(r["a"].get(k)), _fmt(r["b"].get(k)))
    console.print(t)
    console.print(f"lineage: {r['lineage']}; compression ratio (a size / b size): {_fmt(r['compression_ratio'])}")
    console.print(f"layers identical at the same index: {r['shared_layers_by_index'] or 'none'}")
    console.print("b layers identical (by weight hash) to a layers: "
                  + (", ".join(f"b{j}=a{i}" for j, i in r["shared_layers_by_hash"].items()) or "none"))
    console.print(f"other tensors shared: {', '.join(r['shared_other_tensors']) or 'none'}")
    t = Table("metric", "a", "b", "b - a", "better")
    for m, d in r["metric_deltas"].items():
        t.add_row(m, _fmt(d["a"]), _fmt(d["b"]), _fmt(d["delta"]), d["better"] or "")
    console.print(t)


@registry_app.command("promote")
@cli_errors
def promote(ctx: typer.Context, entry_id: str = typer.Argument(...),
            metric: str = typer.Option(..., "--metric", help="metric that must improve (direction from acf objectives)"),
            margin: float = typer.Option(0.0, "--margin", help="minimum improvement over the active entry (absolute)"),
            guard: Optional[str] = typer.Option(None, "--guard", help="comma-separated metrics that must not regress"),
            guard_tolerance: float = typer.Option(0.0, "--guard-tolerance",
                                                  help="allowed relative guard regression (0.01 = 1%); default none"),
            force: bool = typer.Option(False, "--force", help="promote regardless (needs --reason)"),
            reason: str = typer.Option("", "--reason")) -> None:
    """Make an entry active if it beats the active one on --metric by --margin without guard regressions."""
    guards = tuple(g.strip() for g in (guard or "").split(",") if g.strip())
    with open_registry(_path(ctx)) as reg:
        prev = reg.active(reg.get(entry_id).channel)
        e = reg.promote(entry_id, metric, margin, guards, force=force, reason=reason, guard_tolerance=guard_tolerance)
    console.print(f"active: [bold]{e.id}[/] ({e.name}); previous: {prev.id if prev else 'none'}")


@registry_app.command("rollback")
@cli_errors
def rollback(ctx: typer.Context,
             to: Optional[str] = typer.Option(None, "--to", help="a specific earlier entry instead of the last good"),
             channel: str = typer.Option("model", "--channel", help="model | adapter")) -> None:
    """Restore the previous good active entry; the current one is marked rolled back."""
    with open_registry(_path(ctx)) as reg:
        e, cur = reg.rollback(channel, to)
    console.print(f"active: [bold]{e.id}[/] ({e.name}); rolled back from {cur.id if cur else 'none'}")


@registry_app.command("prune")
@cli_errors
def prune(ctx: typer.Context, keep: int = typer.Option(..., "--keep", help="non-active entries to keep (newest)"),
          delete_artifacts: bool = typer.Option(False, "--delete-artifacts", help="also delete their directories")) -> None:
    """Keep the newest K non-active entries (never the active ones or their ancestors; base models stay)."""
    with open_registry(_path(ctx)) as reg:
        gone = reg.prune(keep, delete_artifacts=delete_artifacts)
    console.print(f"pruned {len(gone)}: {', '.join(e.id for e in gone) or 'nothing'}")
