"""The acf CLI run in the test's own process (fast: no second torch import), shared by the test files."""

from __future__ import annotations

import sys


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`acf ARGS...` in this process: (exit code, stdout, stderr)."""
    from acf.cli import main as cli

    old = sys.argv
    sys.argv = ["acf", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err
