"""The `acf` command line. Thin: parse options, call the library, print results; errors are one line, exit 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

if not sys.stderr.isatty():
    # Libraries' tqdm bars (compressed-tensors decompressing 210 modules per model load, calibration loops)
    # turn a redirected log into pages of carriage returns; in a terminal they stay. Must precede tqdm's import:
    # tqdm reads TQDM_* defaults when it is imported.
    os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from rich.table import Table

from acf.core.errors import AcfError
from acf.core.logsetup import setup_logging
from acf.methods.base import DEFAULT_CALIB_MIX

from acf.cli.config_file import load_into
from acf.cli.console import console, err_console
from acf.cli.eval_cmd import eval_cmd
from acf.cli.export_cmd import export_cmd, merge_cmd

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="acf: find the best compressed version of a language model for a task.")
app.command("eval")(eval_cmd)
app.command("export")(export_cmd)
app.command("merge")(merge_cmd)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


class RunInterrupted(Exception):
    """Ctrl-C during `acf run`, carrying the run's directory. typer turns a bare KeyboardInterrupt into exit 130
    and forgets which run it was in, so `run` re-raises it as this and `main` can name the directory to resume."""

    def __init__(self, run_dir: Path):
        super().__init__(str(run_dir))
        self.run_dir = run_dir


def _check_terminal(interactive: bool, recorded: bool = False) -> None:
    """`--interactive` asks at the terminal: refuse it when stdin is not one (a pipe, </dev/null, a batch job)
    before any model loads, instead of failing at the first question after the baseline and the recipes."""
    if interactive and not sys.stdin.isatty():
        how = "this run was started with --interactive (run_config.json)" if recorded else "--interactive"
        raise AcfError(f"{how} asks you to approve each strategy at the terminal, but stdin is not a terminal; run "
                       f"it from a terminal, or answer from Python "
                       f"(acf.coordinator.single_process.Pipeline(cfg).start() / .resume(answer))")


def _read_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """`--config FILE` (eager): the file's options become the defaults of the other options (acf.cli.config_file)."""
    return load_into(ctx, value)


def _dataset_value(dataset: str) -> str:
    """What run_config.json records for --dataset: a task name as given, a file as its absolute path (so a resume
    or a worker started from another folder reads the same file)."""
    from acf.tasks.own_data import is_dataset_file

    return str(Path(dataset).expanduser().resolve()) if is_dataset_file(dataset) else dataset


def _steps(value: str, flag: str = "--recover-steps") -> list[int]:
    try:
        steps = [int(v) for v in _csv(value) or []]
    except ValueError:
        raise AcfError(f"{flag} takes whole numbers separated by commas, e.g. 25,50 (got {value!r})") from None
    return steps   # ranges are checked with the rest of the run's settings (run_context.validate_config)


@app.command()
def run(
    model: str = typer.Option("smollm2-135m", help="alias (smollm2-135m), local HF directory, or hub id"),
    dataset: str = typer.Option("gsm8k", help="task name (gsm8k, commonsenseqa, truthfulqa, bbh[:task], humaneval), "
                                "or your own .jsonl (chat messages or prompt/response pairs) or .csv (prompt, response "
                                "columns) file: see docs/tasks.md"),
    train_share: Optional[float] = typer.Option(None, help="with --dataset FILE: share of its rows kept for "
                                                "calibration and training, never evaluated (default 0.2; chosen by "
                                                "a hash of each row's content)"),
    scorer: Optional[str] = typer.Option(None, help="with --dataset FILE: add generation accuracy, scored by 'exact' "
                                         "(the completion equals the reference) or 'regex:PATTERN' (its first match, "
                                         "group 1 if any, equals the reference's)"),
    calib_data: Optional[Path] = typer.Option(None, help="calibration and training text apart from the evaluation "
                                              "data: a .txt (paragraphs separated by blank lines), .jsonl ({\"text\": "
                                              "...} or chat/prompt-response rows) or .csv (prompt, response) file read "
                                              "instead of the task's train split (--calib-mix still adds general text)"),
    config: Optional[Path] = typer.Option(None, is_eager=True, callback=_read_config,
                                          help="a YAML file of acf run options by long name (e.g. `episodes: 12`, "
                                          "`run-dir: runs/x`); options on the command line override it"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check everything, print the search space, seeds, "
                                 "recipes and estimated cost per step, and exit: no run directory, no weights loaded"),
    episodes: Optional[int] = typer.Option(None, help="compression episodes to run (default 4; with --resume: "
                                           "a larger number extends the run)"),
    run_dir: Optional[Path] = typer.Option(None, help="default runs/<model>-<dataset>-<time>"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this directory"),
    interactive: bool = typer.Option(False, help="approve / edit / skip / stop each strategy before it runs"),
    sampler: str = typer.Option("tpe", help="tpe | nsga2 | random | grid"),
    preset: str = typer.Option("balanced", help="accuracy_focused | latency_focused | balanced | memory_constrained"),
    objectives: Optional[str] = typer.Option(None, help="comma list, >= 2 (default: kld,size, and latency with "
                                             "--runtime llamacpp, where it is measured in the deployment runtime; kld, "
                                             "top1 and kld_general are fidelity to the uncompressed model, on any task)"),
    min_retention: Optional[float] = typer.Option(0.9, help="hard constraint on task-quality retention (when a task "
                                                  "quality metric such as answer_nll or accuracy is an objective)"),
    max_kld: Optional[float] = typer.Option(None, help="hard constraint: kld to the uncompressed model at most this "
                                            "many nats/token (default 0.5; see SPEC.md)"),
    controls: bool = typer.Option(True, help="measure 'baseline + the same recovery, no compression' once per "
                                  "recovery recipe, so task adaptation is reported apart from compression"),
    limit: Optional[int] = typer.Option(100, help="evaluation items per candidate"),
    proxy_limit: Optional[int] = typer.Option(24, help="items for the cheap proxy evaluation that prunes candidates"),
    accuracy_limit: Optional[int] = typer.Option(None, help="cap on items for generation accuracy (slow on CPU)"),
    final_limit: Optional[int] = typer.Option(None, help="at the end, evaluate the baseline and frontier members on "
                                              "this many held-out test items (after the --limit search items)"),
    final_metrics: Optional[str] = typer.Option(None, help="metrics for the final evaluation (default: the task's; "
                                                "kld, top1 and kld_general always); with --resume, --final-limit and "
                                                "--final-metrics replace the recorded ones"),
    budget_minutes: Optional[float] = typer.Option(None, help="stop starting episodes after this much wall time"),
    patience: Optional[int] = typer.Option(None, help="stop after K episodes without frontier change"),
    seed: int = typer.Option(0),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default SQLite in the run dir)"),
    study: Optional[str] = typer.Option(None, help="study name (default from the run dir)"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if present)"),
    keep_all: bool = typer.Option(False, help="keep every candidate's model, not only frontier members"),
    calib_samples: int = typer.Option(64, help="calibration samples for calibrated methods"),
    seq_len: int = typer.Option(512, help="tokens per calibration sample"),
    calib_mix: float = typer.Option(DEFAULT_CALIB_MIX, help="share of calibration windows (and kd_tune examples) "
                                    "from general text (other tasks' train splits) instead of the task's"),
    recipes: Optional[str] = typer.Option(None, help="the fixed recipes every claim is measured against (measured "
                                          "once before the search, cached per model/task/calibration): default all "
                                          "the model admits (GPTQ ± act-order at each group size, AWQ, AutoRound W4/W3, "
                                          "GPTQ W3/W8, W8A8; with --runtime llamacpp the k-quants with imatrix); a "
                                          "comma list such as gptq_w4g64_ao,autoround_w4g64 narrows it; 'none' skips"),
    recover_steps: str = typer.Option("25,50,100", help="training-step choices for LoRA/distillation recovery; the "
                                      "seeded combination uses the middle one (the only one if one is given)"),
    tune_steps: str = typer.Option("50,100,200", help="training-step choices for kd_tune after a weight-only "
                                   "quantizer (the seeded combination uses 100 if offered, else the middle one)"),
    tune_methods: Optional[str] = typer.Option(None, help="narrow the tune slot after weight-only quantizers: "
                                               "none,kd_tune (default); 'none' turns it off"),
    data_dir: Optional[Path] = typer.Option(None, help="local folder of the task's data"),
    eval_batch_size: Optional[int] = typer.Option(None, help="evaluation batch (default: from free GPU memory; 8 on "
                                                  "CPU)"),
    quant_methods: Optional[str] = typer.Option(None, help="narrow the search: quantization methods to try, e.g. "
                                                "none,rtn,gptq,bnb_nf4,gguf (default: all but gguf; "
                                                "--runtime llamacpp: gguf)"),
    runtime: str = typer.Option("transformers", help="deployment target where latency/memory are measured: "
                                "transformers, or llamacpp (every candidate exported to GGUF and measured in "
                                "llama.cpp on the CPU, the baseline as its F16 GGUF)"),
    prune_methods: Optional[str] = typer.Option(None, help="narrow the search: pruning methods to try, e.g. "
                                                "none,wanda,drop_layers (default: all)"),
    planner: Optional[str] = typer.Option(None, help="optional LLM planner provider:model"),
    planner_share: float = typer.Option(0.5, help="share of episodes proposed by the planner"),
    planner_max_calls: int = typer.Option(50),
    planner_timeout: float = typer.Option(120.0, help="seconds one planner call may take before it is abandoned "
                                          "(the episode falls back to Optuna)"),
    planner_retries: int = typer.Option(1, help="extra attempts after a planner call fails or times out"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the hub (off by default)"),
    skip_sanity: bool = typer.Option(False, "--skip-sanity", help="go on although the baseline sanity check finds "
                                     "the model implausible (NLL, repetition, characters per token; see SPEC.md); "
                                     "with --resume it overrides a recorded failure"),
    workers: Optional[int] = typer.Option(None, help="K local worker processes share the study (one per GPU); 0: "
                                          "only coordinate workers started with `acf worker`"),
    artifacts: Optional[Path] = typer.Option(None, help="with --workers: shared folder for compressed models"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Search compressed versions of MODEL for DATASET: propose, compress, evaluate, keep the Pareto frontier."""
    from acf.coordinator.run_context import DEFAULT_MAX_KLD, RunConfig, default_objectives
    from acf.coordinator.single_process import load_run_config, run_in_terminal

    setup_logging(verbose)
    if resume is not None:
        cfg = load_run_config(resume)
        if model != "smollm2-135m" and model != cfg.model:
            raise AcfError(f"--resume {resume}: that run is for model {cfg.model!r}, not {model!r}")
        if dataset != "gsm8k" and _dataset_value(dataset) != cfg.dataset:
            raise AcfError(f"--resume {resume}: that run is for dataset {cfg.dataset!r}, not {dataset!r}")
        given_calib = str(calib_data.expanduser().resolve()) if calib_data is not None else None
        for flag, given, recorded in (("--train-share", train_share, cfg.train_share),
                                      ("--scorer", scorer, cfg.scorer), ("--calib-data", given_calib, cfg.calib_data)):
            if given is not None and given != recorded:
                raise AcfError(f"--resume {resume}: that run was started with {flag} {recorded}; its measurements "
                               f"depend on it, so it cannot change to {given}")
        if episodes is not None and episodes > cfg.episodes:
            cfg.episodes = episodes  # resuming with more episodes extends the run
        _check_terminal(interactive or cfg.interactive, recorded=not interactive)
        cfg.interactive = interactive or cfg.interactive
        if device:
            cfg.device = device
        cfg.skip_sanity = skip_sanity or cfg.skip_sanity   # an override given on resume is kept in run_config.json
        # the held-out report's settings touch no search figure, so a resume may change them (e.g. drop generation
        # accuracy that turned out too slow on a CPU); members already reported keep theirs, each with its own n
        if final_limit is not None:
            cfg.final_limit = final_limit
        if final_metrics:
            cfg.final_metrics = _csv(final_metrics)
    else:
        from acf.tasks import get_task

        _check_terminal(interactive)
        # an unknown task, or a bad row of a dataset file, fails before a run dir is made
        task = get_task(dataset, str(data_dir) if data_dir else None, train_share=train_share, scorer=scorer)
        if calib_data is not None:
            from acf.tasks.calib_text import read_calib_data

            read_calib_data(calib_data)   # a bad line is refused before a run dir is made (bound in validate_config)
        objs = objectives or ",".join(default_objectives(runtime))
        label = Path(task.path).stem if getattr(task, "path", None) else dataset.replace(':', '_')
        rd = run_dir or Path("runs") / f"{Path(model).name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = RunConfig(model=model, dataset=_dataset_value(dataset), data_dir=str(data_dir) if data_dir else None,
                        train_share=train_share, scorer=scorer, episodes=4 if episodes is None else episodes,
                        calib_data=str(calib_data.expanduser().resolve()) if calib_data is not None else None,
                        run_dir=str(rd), interactive=interactive, sampler=sampler, preset=preset,
                        objectives=objs.split(","), min_retention=min_retention, limit=limit, proxy_limit=proxy_limit,
                        max_kld=DEFAULT_MAX_KLD if max_kld is None else max_kld, controls=controls,
                        accuracy_limit=accuracy_limit, final_limit=final_limit,
                        final_metrics=_csv(final_metrics) or None, budget_minutes=budget_minutes, patience=patience, seed=seed,
                        storage=storage, study_name=study, device=device or "auto", keep_all=keep_all,
                        calib_samples=calib_samples, seq_len=seq_len, eval_batch_size=eval_batch_size, planner=planner,
                        planner_share=planner_share, planner_max_calls=planner_max_calls,
                        planner_timeout=planner_timeout, planner_retries=planner_retries,
                        quant_methods=_csv(quant_methods), prune_methods=_csv(prune_methods), runtime=runtime,
                        recover_steps=_steps(recover_steps), tune_steps=_steps(tune_steps, "--tune-steps"),
                        tune_methods=_csv(tune_methods), calib_mix=calib_mix, recipes=_csv(recipes),
                        trust_remote_code=trust_remote_code, skip_sanity=skip_sanity, command=[Path(sys.argv[0]).name] + sys.argv[1:])
    if dry_run:
        from acf.coordinator.dry_run import plan_run, render

        for line in render(plan_run(cfg, resume=resume is not None)):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    try:
        if workers is not None:
            return _run_workers(cfg, workers, artifacts, resume=resume is not None)
        ctx = run_in_terminal(cfg, console, resume=resume is not None)
    except KeyboardInterrupt:
        # the folder the user gave to --resume (the recorded run_dir may name where the run was first made)
        raise RunInterrupted(resume if resume is not None else Path(cfg.run_dir)) from None
    console.print(f"\nfrontier JSON: {ctx.frontier_path}")
    from acf.reports.report import write_report

    try:
        rep = write_report(ctx.dir)
        console.print(f"report:        {rep}")
    except Exception as e:  # the run's results are safe on disk; the report can be redone with `acf report`
        err_console.print(f"[yellow]report not written[/] ({type(e).__name__}: {e}); retry with `acf report {ctx.dir}`")
    console.print(f"notebook:      examples/inspect_frontier.ipynb (ACF_RUN_DIR={ctx.dir})")


def _run_workers(cfg, workers: int, artifacts: Optional[Path], resume: bool = False) -> None:
    """`--workers K`: the coordinator of a shared study (acf.distributed); the graph path is not used."""
    from acf.distributed import run_coordinator
    from acf.coordinator.records import frontier_table
    from acf.coordinator.run_context import RunContext

    ff = run_coordinator(cfg, workers, artifacts, console, resume=resume)
    ctx = RunContext(cfg, console)
    ctx.ff = ff
    console.print(frontier_table(ctx))
    if ff.recommended:
        console.print(f"[bold]recommended[/]: {ff.recommended.id} — {ff.recommended.why}")
    console.print(f"\nfrontier JSON: {ctx.frontier_path}  (stopped: {ff.run.stopped_because})")
    from acf.reports.report import write_report

    try:
        console.print(f"report:        {write_report(ctx.dir)}")
    except Exception as e:  # the results are safe in the study and frontier.json; `acf report` can redo this
        err_console.print(f"[yellow]report not written[/] ({type(e).__name__}: {e}); retry with `acf report {ctx.dir}`")


@app.command()
def spec(model: str = typer.Option("smollm2-135m"), as_json: bool = typer.Option(False, "--json"),
         trust_remote_code: bool = typer.Option(False)):
    """Model spec: sizes, layers, valid quantization group sizes, memory estimates, and the tokenizer facts acf uses."""
    from acf.models.loading import resolve_model
    from acf.models.spec import infer_spec, spec_summary

    setup_logging(False)
    s = infer_spec(resolve_model(model), trust_remote_code)
    d = spec_summary(s)
    if as_json:
        print(json.dumps(d, indent=2))
        return
    tok_fields = ("adds_bos", "bos_token", "eos_token", "chat_template", "tokenizer_vocab_size")
    t = Table(title=f"spec of {model}")
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for k, v in d.items():
        if k not in tok_fields:
            t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(t)
    # The facts that decide how every prompt is tokenized, said in words: a wrong BOS or a missing chat template
    # is the usual reason a model a user brings scores far below what it should.
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    t = Table(title="tokenizer (as acf uses it)")
    t.add_column("fact")
    t.add_column("value")
    t.add_column("what acf does", overflow="fold")
    t.add_row("adds BOS", yes(s.adds_bos), f"every prompt starts with {s.bos_token} exactly once" if s.adds_bos
              else "prompts are encoded without a BOS token (the tokenizer adds none)")
    t.add_row("chat template", yes(s.chat_template), "zero-shot prompts are rendered with it" if s.chat_template
              else "plain 'Question: ... Answer:' prompts")
    t.add_row("vocabulary", f"{s.tokenizer_vocab_size:,}" if s.tokenizer_vocab_size is not None else "-",
              f"tokenizer entries; the embedding has {s.vocab_size:,} rows")
    t.add_row("tied embeddings", yes(s.tied_embeddings), "lm_head shares the input embedding (stored once)"
              if s.tied_embeddings else "lm_head is a separate matrix")
    t.add_row("eos token", str(s.eos_token), "ends reference answers in teacher-forced scoring")
    console.print(t)


@app.command()
def methods():
    """The compression methods, their libraries and parameters."""
    from acf.methods.strategy import method_table

    t = Table(title="methods")
    for c in ("method", "kind", "library", "parameters (default)"):
        t.add_column(c, overflow="fold")
    for row in method_table():
        ps = ", ".join(f"{k}={v.get('default')}" for k, v in row["params"].items())
        t.add_row(row["method"], row["kind"], row["library"], ps)
    console.print(t)


@app.command()
def compress(
    strategy: str = typer.Option(..., help="strategy JSON (inline) or a path to a JSON file"),
    model: str = typer.Option("smollm2-135m"),
    out: Path = typer.Option(..., help="output model directory"),
    dataset: str = typer.Option("gsm8k", help="task whose train split gives calibration/training text"),
    data_dir: Optional[Path] = typer.Option(None),
    calib_samples: Optional[int] = typer.Option(None, help="override calib_samples of every calibrated step"),
    calib_mix: float = typer.Option(DEFAULT_CALIB_MIX, help="share of calibration text from outside the task"),
    calib_data: Optional[Path] = typer.Option(None, help="calibration/training text from this .txt, .jsonl or .csv "
                                              "file instead of the task's train split"),
    device: Optional[str] = typer.Option(None),
    seed: int = typer.Option(0),
    trust_remote_code: bool = typer.Option(False),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run one strategy directly and print each step's record."""
    from acf.methods import StepContext
    from acf.methods.run_steps import run_strategy
    from acf.models.loading import resolve_device, resolve_model
    from acf.models.spec import infer_spec
    from acf.methods.strategy import parse_strategy, validate_strategy
    from acf.tasks import get_task

    setup_logging(verbose)
    calib = None
    if calib_data is not None:
        from acf.tasks.calib_text import read_calib_data

        calib = read_calib_data(calib_data)   # a bad line is refused before any model loads
    dev = resolve_device(device)
    strat = parse_strategy(strategy)
    if calib_samples:
        from acf.methods.registry import get as get_method

        for s in strat.steps:   # the calibrated steps: those whose params take calib_samples
            m = get_method(s.method)
            if m is not None and "calib_samples" in m.params.model_fields:
                s.params["calib_samples"] = calib_samples
    path = resolve_model(model)
    strat = validate_strategy(strat, infer_spec(path, trust_remote_code), dev)
    if out.exists() and any(out.iterdir()):
        raise AcfError(f"--out {out} exists and is not empty: choose a new directory")
    task = get_task(dataset, str(data_dir) if data_dir else None)
    if calib is not None:
        from acf.tasks.calib_text import CalibTextTask

        task = CalibTextTask(task, calib)
    console.print(f"[bold]strategy[/]: {strat.describe()}")
    if not 0.0 <= calib_mix <= 1.0:
        raise AcfError(f"--calib-mix is a share: give 0..1 (got {calib_mix})")
    records = run_strategy(strat, path, out, StepContext(device=dev, task=task, teacher_dir=path, seed=seed,
                                                           trust_remote_code=trust_remote_code, calib_mix=calib_mix))
    t = Table(title="steps")
    for c in ("method", "status", "wall s", "peak memory MiB", "output MiB", "notes"):
        t.add_column(c, overflow="fold")
    for r in records:
        t.add_row(r.method, r.status, f"{r.wall_seconds:.1f}",
                  "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.0f}",
                  "-" if r.output_size_bytes is None else f"{r.output_size_bytes / 2**20:.1f}", r.reason or "")
    console.print(t)
    if any(r.status != "ok" for r in records):
        raise AcfError(next(r.reason for r in records if r.status != "ok") or "a step failed")
    console.print(f"model written to {out}")


@app.command("check-deploy")
def check_deploy(model_dir: Path = typer.Argument(..., help="a saved compressed-tensors model directory"),
                 target: str = typer.Option("vllm", help="runtime whose loader rules to apply (vllm)")):
    """Check a saved model against a runtime's loader rules, read from its source (acf.methods.vllm_rules): fused
    layers in one scheme, whole fused layers ignored, formats its kernels serve. Nothing is loaded: a model that
    passes conforms by rules. Exit 2 with one line per violation."""
    from acf.methods.deploy_check import check_vllm
    from acf.methods.vllm_rules import VLLM_READ

    if target != "vllm":
        raise AcfError(f"--target {target!r}: only 'vllm' has loader rules here (transformers loads any per-layer "
                       f"format)")
    if not (model_dir / "config.json").is_file():
        raise AcfError(f"{model_dir}: no config.json (not a saved model directory)")
    found = check_vllm(model_dir)
    for v in found:
        print(v)
    if found:
        raise typer.Exit(2)
    print(f"conforms (by rules; not loaded): {VLLM_READ}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory")):
    """Write report.md and plots for a run."""
    from acf.reports.report import write_report

    p = write_report(run_dir)
    console.print(f"wrote {p}")


def _mount_optional() -> None:
    """Sub-apps from modules that own them; absent modules simply add no command."""
    import importlib

    for mod, attr, name in (("acf.cli.registry_cmd", "registry_app", "registry"),
                            ("acf.cli.lifecycle_cmd", "distill_app", "distill")):
        try:
            app.add_typer(getattr(importlib.import_module(mod), attr), name=name)
        except (ImportError, AttributeError):
            pass
    try:
        from acf.cli.extract_cmd import extract_cmd

        app.command("extract")(extract_cmd)
    except (ImportError, AttributeError):
        pass
    try:
        from acf.distributed import rebuild_cmd, worker_cmd

        app.command("worker")(worker_cmd)
        app.command("rebuild-frontier")(rebuild_cmd)
    except (ImportError, AttributeError):
        pass


_mount_optional()


def _usage_error(e: BaseException) -> Optional[tuple[int, Optional[str]]]:
    """(exit code, one line or None) for a command-line parsing error (bad value, unknown option, missing one), or
    None for any other exception. With standalone_mode=False these reach `main` as exceptions; typer >= 0.2x raises
    its own copy of click's classes (`typer.TyperException` at their root), which `click.ClickException` does not
    catch, so `acf run --limit abc` printed a 78-line traceback."""
    bases: list[type] = [c for c in (getattr(typer, "TyperException", None),) if c is not None]
    try:
        import click

        bases.append(click.exceptions.ClickException)
    except ImportError:
        pass
    if not isinstance(e, tuple(bases)):
        return None
    code = int(getattr(e, "exit_code", 2))
    if type(e).__name__ == "NoArgsIsHelpError":   # the help text has been printed already
        return code, None
    msg = e.format_message() if hasattr(e, "format_message") else str(e)
    ctx = getattr(e, "ctx", None)
    where = f" ({ctx.command_path} --help lists the options)" if ctx is not None and code == 2 else ""
    return code, " ".join(str(msg).split()) + where


def main() -> None:
    try:
        rv = app(standalone_mode=False)
        # typer turns Ctrl-C into a returned 130 when not in standalone mode
        if rv == 130:
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except AcfError as e:
        err_console.print(f"[red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except RunInterrupted as e:
        from rich.markup import escape

        if (e.run_dir / "run_config.json").is_file():
            tail = f"what was recorded is kept; continue with `acf run --resume {escape(str(e.run_dir))}`"
        else:
            tail = f"the run had not started ({escape(str(e.run_dir))} holds no run_config.json); nothing to resume"
        err_console.print(f"\n[yellow]interrupted[/]: {tail}", soft_wrap=True)
        sys.exit(130)
    except KeyboardInterrupt:   # any other command: nothing of it is resumable
        err_console.print("\n[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # typer/click usage errors come here in standalone_mode=False
        usage = _usage_error(e)
        if usage is not None:
            code, line = usage
            if line:
                from rich.markup import escape

                err_console.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
            sys.exit(code)
        if isinstance(e, typer.Abort):   # EOF at a prompt (typer.Abort is click's in older typer)
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
