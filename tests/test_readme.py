"""The README's commands are the first thing a newcomer copies: every command line in its code blocks names a real
command and only options that command takes, the cheap ones run as written, and its Python block runs on a
committed run. No model is compressed here (`make demo` and the pipeline are covered by their own tests)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[list[str]]:
    """Each shell line that runs acf (`acf ...` or `python run_pipeline.py ...`), comments and continuations
    joined, as argv after the program name ("run" for run_pipeline.py)."""
    out = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("ACF_RUN_DIR="):
                continue
            if line.startswith("python run_pipeline.py"):
                out.append(["run"] + shlex.split(line)[2:])
            elif line.startswith("acf "):
                out.append(shlex.split(line)[1:])
    return out


def _click_command(argv: list[str]):
    """The click command argv names (a group's subcommand included; `a|b|c` alternatives: the first)."""
    import typer

    from acf.cli.main import app

    cmd = typer.main.get_command(app)
    rest = list(argv)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0).split("|")[0]
        assert name in cmd.commands, f"README names `acf ... {name}`, which is not a command"
        cmd = cmd.commands[name]
    return cmd


def test_every_readme_command_names_real_options():
    lines = _command_lines()
    assert len(lines) >= 15    # the README's examples, not an empty parse
    for argv in lines:
        cmd = _click_command(argv)
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        used = {a.split("=")[0] for a in argv if a.startswith("--")}
        assert used <= known, f"`{' '.join(argv)}`: {sorted(used - known)} not options of that command"


def test_the_cheap_readme_commands_run_as_written(capsys):
    """`acf spec --model smollm2-135m --json` says what the README says of group sizes; `acf methods` lists the
    methods."""
    from cli_run import run_cli

    assert ["spec", "--model", "smollm2-135m", "--json"] in _command_lines()
    code, out, err = run_cli(capsys, "spec", "--model", "smollm2-135m", "--json")
    assert code == 0, err
    spec = json.loads(out)
    assert 32 in spec["valid_group_sizes"] and 64 in spec["valid_group_sizes"]
    assert "128" in spec["invalid_group_sizes"]                 # "32 and 64 valid, 128 invalid (576 wide)"
    code, out, err = run_cli(capsys, "methods")
    assert code == 0 and "gptq" in out and "autoround" in out, err


def test_the_readme_python_block_runs_on_a_committed_run():
    runs = sorted(p.parent for p in (ROOT / "experiments" / "results").glob("*/frontier.json"))
    assert runs
    block = _blocks("python")[0].replace("runs/<dir>", str(runs[0]))
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)          # noqa: S102 (the README's own code)
    df = scope["df"]
    assert len(df) > 0 and "id" in df.columns


@pytest.mark.parametrize("needle", ["make demo", "make test"])
def test_the_two_setup_commands_are_the_first_block(needle):
    assert needle in _blocks("bash")[0]
