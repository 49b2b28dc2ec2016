"""`acf run --config run.yaml`: any `acf run` option by its long name, as the defaults the command line overrides.

The file becomes the command context's `default_map` before the other options are parsed (the `--config` option is
eager), so a value from the file goes through the same conversion and checks as the same value typed as a flag, and
the RunConfig built from it is the one the flags would build; that RunConfig is what run_config.json records.
Only duck-typed context and parameter attributes are used: typer >= 0.2x carries its own copy of click's classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from acf.core.errors import AcfError

#: options a config file may not set: itself (no nesting)
NOT_IN_FILE = ("config",)


def read_yaml_options(path: Path) -> dict[str, Any]:
    """The file's mapping, keys as written; one-line AcfError for a missing file, bad YAML or a non-mapping."""
    import yaml

    if not path.is_file():
        raise AcfError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise AcfError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AcfError(f"--config {path}: cannot read ({type(e).__name__}: {e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AcfError(f"{path}: expected a mapping of option: value (e.g. `episodes: 12`), got a "
                       f"{type(data).__name__}")
    return data


def default_map(ctx: Any, path: Path) -> dict[str, Any]:
    """The file's options as parameter names -> values, each checked by its option's own conversion now (so a bad
    value is named with the file and key). A key may use dashes or underscores (`run-dir`, `run_dir`); an unknown
    key, or one naming no settable option, is refused by name; a list is joined with commas for a comma-list option
    (`objectives: [kld, size]`); null means unset."""
    params = {p.name: p for p in ctx.command.params if getattr(p, "param_type_name", "") == "option" and p.name}
    out: dict[str, Any] = {}
    for key, value in read_yaml_options(path).items():
        name = str(key).strip().lstrip("-").replace("-", "_")
        if name not in params or name in NOT_IN_FILE:
            known = ", ".join(sorted(n.replace("_", "-") for n in params if n not in NOT_IN_FILE))
            raise AcfError(f"{path}: unknown option {key!r} (acf run options, by long name: {known})")
        if value is None:
            continue
        if isinstance(value, dict):
            raise AcfError(f"{path}: {key}: expected a value, got a mapping")
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        _check(ctx, params[name], value, path, key)
        out[name] = value
    return out


def _check(ctx: Any, param: Any, value: Any, path: Path, key: Any) -> None:
    """Convert `value` as the option would (its callback, if any, is not one with effects: --config is excluded)."""
    try:
        param.process_value(ctx, value)
    except Exception as e:  # the library's BadParameter (click's or typer's copy): one line naming file and key
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        raise AcfError(f"{path}: {key}: {' '.join(str(msg).split())}") from None


def load_into(ctx: Any, path: Optional[Path]) -> Optional[Path]:
    """The eager `--config` callback: put the file's options where the parser looks for defaults."""
    if path is None or getattr(ctx, "resilient_parsing", False):
        return path
    ctx.default_map = {**(ctx.default_map or {}), **default_map(ctx, Path(path))}
    return path
