"""`acf distill ...`: the adapter loop (collect -> train -> eval -> promote / rollback)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from acf.cli.registry_cmd import cli_errors

distill_app = typer.Typer(help="Adapter loop: collect good pairs, train a LoRA/QLoRA adapter, evaluate, promote, "
                               "roll back.", no_args_is_help=True, add_completion=False)

_REG = typer.Option(None, "--registry", envvar="ACF_REGISTRY",
                    help="registry JSON file (default: $ACF_HOME/registry.json)")


@distill_app.command("collect")
@cli_errors
def collect_cmd(runs: Path = typer.Option(..., "--runs", help="runs log: .csv or .jsonl with prompt, answer, score, "
                                                               "approved (optional id)"),
                eval_file: Optional[Path] = typer.Option(None, "--eval", help="CSV/JSONL with id or prompt + score "
                                                                               "and/or approved (overrides the runs')"),
                out: Path = typer.Option(Path("distill_dataset.jsonl"), "--out", help="dataset to grow (JSONL)"),
                min_score: float = typer.Option(0.7, "--min-score"),
                allow_secrets: bool = typer.Option(False, "--allow-secrets",
                                                   help="keep rows with secret-looking strings (not recommended)")) -> None:
    """Append approved rows scoring >= --min-score to the dataset (deduplicated, secrets refused); stats beside it."""
    from acf.lifecycle import collect, stats_path

    st = collect(runs, out, eval_file, min_score, allow_secrets)
    if st.secrets_refused:
        rows = ", ".join(f"row {r['row']} ({'; '.join(r['patterns'])})" for r in st.secret_rows[:10])
        typer.echo(f"refused {st.secrets_refused} row(s) with secret-looking strings: {rows} "
                   f"(use --allow-secrets only if they are not real)", err=True)
    typer.echo(f"kept {st.kept} of {st.rows_read} rows ({st.below_min_score} below {min_score}, {st.not_approved} not "
               f"approved, {st.duplicates_in_batch} duplicates, {st.already_in_dataset} already present); dataset "
               f"{out}: {st.dataset_rows_before} -> {st.dataset_rows_after} rows; stats: {stats_path(out)}")


@distill_app.command("train")
@cli_errors
def train_cmd(config: Path = typer.Option(..., "--config", help="JSON: base_model, adapter_type (lora|qlora), "
                                                                 "train_steps, max_train_minutes, batch_size, lr, "
                                                                 "eval_steps, output_dir, dataset (+ rank, alpha, ...)"),
              registry: Optional[Path] = _REG,
              no_register: bool = typer.Option(False, "--no-register", help="do not record it in the registry")) -> None:
    """Train an adapter; writes output_dir/<date-time>/ (adapter, metrics.json, loss_curve.png) and registers it."""
    from acf.lifecycle import train

    r = train(config, registry_path=registry, register=not no_register, log=typer.echo)
    typer.echo(f"adapter: {r.adapter_dir}" + (f" (registry id {r.registry_id})" if r.registry_id else ""))


@distill_app.command("eval")
@cli_errors
def eval_cmd(adapter: str = typer.Option(..., "--adapter", help="adapter directory or registry id"),
             eval_csv: Optional[Path] = typer.Option(None, "--eval-csv", help="guard rows: prompt, expected, "
                                                                              "category (safety|format|...), scorer"),
             scorer: str = typer.Option("auto", "--scorer", help="auto | exact | f1 | contains | a registered one"),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
             device: Optional[str] = typer.Option(None, "--device"),
             registry: Optional[Path] = _REG) -> None:
    """Base vs adapted on the held-out 20% and guard rows; prints the table and saves eval.json in the adapter dir."""
    from acf.lifecycle import eval_table, evaluate_adapter

    res = evaluate_adapter(adapter, eval_csv, scorer, max_new_tokens, device, registry, log=typer.echo)
    typer.echo(eval_table(res))
    typer.echo(f"saved {Path(res.adapter_dir) / 'eval.json'}")


@distill_app.command("promote")
@cli_errors
def promote_cmd(adapter: str = typer.Option(..., "--adapter", help="adapter directory or registry id"),
                min_gain: float = typer.Option(0.05, "--min-gain", help="required held-out gain over the base"),
                force: bool = typer.Option(False, "--force"), reason: str = typer.Option("", "--reason"),
                export: Optional[str] = typer.Option(None, "--export", help="also export the adapter merged into "
                                                     "its base, e.g. gguf:Q4_K_M (deploy link under $ACF_HOME/deploy)"),
                registry: Optional[Path] = _REG) -> None:
    """Activate the adapter if it beats the base by --min-gain on average with no guard regression."""
    from acf.lifecycle import promote_adapter

    e = promote_adapter(adapter, min_gain, registry, force, reason, export=export)
    typer.echo(f"active adapter: {e.id} ({e.path})")
    if e.source.get("gguf_export"):
        typer.echo(f"GGUF: {e.source['gguf_export']['path']}")


@distill_app.command("rollback")
@cli_errors
def rollback_cmd(adapter_id: str = typer.Argument(..., help="registry id of the adapter to restore"),
                 registry: Optional[Path] = _REG) -> None:
    """Restore an earlier adapter as active; keep the last 3 adapters (older ones are deleted)."""
    from acf.lifecycle import rollback_adapter

    target, prev, pruned = rollback_adapter(adapter_id, registry)
    typer.echo(f"active adapter: {target.id} ({target.path}); was {prev.id if prev else 'none'}"
               + (f"; removed {', '.join(p.id for p in pruned)}" if pruned else ""))
