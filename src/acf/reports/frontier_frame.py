"""A run's frontier.json as pandas frames and matplotlib plots: what the report embeds and the notebook
(examples/inspect_frontier.ipynb) explores. Plots use matplotlib's object API (`Figure`, no pyplot), so they render
headless and never change the backend of a notebook that imports this module."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from acf.core.objectives import DIRECTIONS
from acf.coordinator.state import Candidate, FrontierFile, load_frontier_file

NON_OK = ("failed", "pruned", "rejected", "skipped")


# ----------------------------------------------------------------------------------------------- loading

def _flatten_strategy(c: Candidate) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": c.strategy.describe(), "n_steps": len(c.strategy.steps)}
    for i, step in enumerate(c.strategy.steps, 1):
        out[f"step{i}.method"] = step.method
        for k, v in step.params.items():
            # lists/tuples (ignored layers, targets) become text so the column stays a plain scalar
            out[f"step{i}.{k}"] = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def _row(c: Candidate, ff: FrontierFile, is_baseline: bool, base_size: Optional[float]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": c.id, "episode": c.episode, "is_baseline": is_baseline, "status": c.status, "reason": c.reason,
        "description": c.description, "proposed_by": c.proposed_by,
        "on_frontier": c.id in ff.frontier, "recommended": bool(ff.recommended and ff.recommended.id == c.id),
        "retention": 1.0 if is_baseline and c.retention is None else c.retention,
        "reward": c.reward, "artifact": c.artifact,
    }
    row.update(_flatten_strategy(c))
    for name, m in c.metrics.items():
        row[name] = m.value
    for name, v in c.objectives.items():       # objectives are metric values; fill any the metrics lack
        if row.get(name) is None:
            row[name] = v
    size = row.get("size")
    row["compression_ratio"] = (base_size / size) if (base_size and size) else None
    for k, v in c.timings.items():
        row[f"time.{k}"] = v
    row["time.total"] = sum(c.timings.values()) if c.timings else None
    return row


def frontier_to_frame(ff: FrontierFile) -> pd.DataFrame:
    """One row per candidate (baseline first). `attrs` carries objectives, directions, hypervolume, run meta."""
    base_size = None
    if ff.baseline is not None and "size" in ff.baseline.metrics:
        base_size = ff.baseline.metrics["size"].value
    rows = []
    if ff.baseline is not None:
        rows.append(_row(ff.baseline, ff, True, base_size))
    rows += [_row(c, ff, False, base_size) for c in ff.candidates]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.set_index("id", drop=False)
    df.attrs["objectives"] = list(ff.run.objectives)
    df.attrs["directions"] = {o: ff.run.directions.get(o, DIRECTIONS.get(o, "minimize")) for o in ff.run.objectives}
    df.attrs["hypervolume"] = [h.model_dump() for h in ff.hypervolume]
    df.attrs["run"] = ff.run.model_dump()
    df.attrs["frontier"] = list(ff.frontier)
    df.attrs["recommended"] = ff.recommended.model_dump() if ff.recommended else None
    return df


def recipes_to_frame(ff: FrontierFile) -> pd.DataFrame:
    """The yardstick's fixed recipes, one row each (columns as `frontier_to_frame`'s, plus `on_recipe_frontier`), so a
    notebook can plot acf's candidates against them."""
    base_size = ff.baseline.metrics["size"].value if ff.baseline is not None and "size" in ff.baseline.metrics else None
    front = {c.id for c in ff.recipe_frontier()}
    rows = [{**_row(c, ff, False, base_size), "on_recipe_frontier": c.id in front} for c in ff.recipes]
    df = pd.DataFrame(rows)
    return df.set_index("id", drop=False) if not df.empty else df


def load_frontier(path: str | Path) -> pd.DataFrame:
    """Load a run dir or frontier.json as a DataFrame (refuses corrupt or other-schema-version files by name).

    Columns: id, episode, is_baseline, status, reason, on_frontier, recommended, retention, reward, artifact,
    compression_ratio, one column per metric value, strategy / n_steps / stepN.method / stepN.<param>,
    time.<stage> and time.total.
    """
    return frontier_to_frame(load_frontier_file(path))


def hypervolume_frame(df_or_path: pd.DataFrame | str | Path) -> pd.DataFrame:
    df = df_or_path if isinstance(df_or_path, pd.DataFrame) else load_frontier(df_or_path)
    return pd.DataFrame(df.attrs.get("hypervolume") or [], columns=["episode", "hypervolume"])


# ----------------------------------------------------------------------------------------------- plots

def plot_projection(df: pd.DataFrame, x: str, y: str, ax) -> None:
    """One 2-D projection: dominated candidates grey, frontier members highlighted, baseline and pick marked."""
    ok = df[(df["status"] == "ok") & df[x].notna() & df[y].notna()] if x in df and y in df else df.iloc[0:0]
    dom = ok[~ok["on_frontier"] & ~ok["is_baseline"]]
    front = ok[ok["on_frontier"]]
    base = ok[ok["is_baseline"]]
    ax.scatter(dom[x], dom[y], c="lightgrey", edgecolors="grey", s=30, label="dominated", zorder=2)
    if len(front):
        f = front.sort_values(x)
        ax.plot(f[x], f[y], color="tab:blue", alpha=0.4, zorder=1)
        ax.scatter(f[x], f[y], c="tab:blue", s=55, label="frontier", zorder=3)
        for cid, r in f.iterrows():
            ax.annotate(str(cid), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if len(base):
        ax.scatter(base[x], base[y], marker="s", c="black", s=60, label="baseline", zorder=4)
    rec = ok[ok["recommended"]]
    if len(rec):
        ax.scatter(rec[x], rec[y], marker="*", c="gold", edgecolors="black", s=220, label="recommended", zorder=5)
    dirs = df.attrs.get("directions", {})
    ax.set_xlabel(f"{x} ({'higher' if dirs.get(x, DIRECTIONS.get(x)) == 'maximize' else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if dirs.get(y, DIRECTIONS.get(y)) == 'maximize' else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_hypervolume(df: pd.DataFrame, ax) -> None:
    hv = hypervolume_frame(df)
    if len(hv):
        ax.plot(hv["episode"], hv["hypervolume"], marker="o")
    ax.set_xlabel("episode")
    ax.set_ylabel("hypervolume (baseline-normalised)")
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> None:
    """Atomic PNG write: a killed process leaves the old plot or none."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_plots(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    out: list[Path] = []
    objs = [o for o in df.attrs.get("objectives", []) if o in df.columns]
    for x, y in itertools.combinations(objs, 2):
        fig = Figure(figsize=(5.5, 4.2))
        plot_projection(df, x, y, fig.add_subplot(111))
        p = out_dir / f"frontier_{x}_vs_{y}.png"
        save_figure(fig, p)
        out.append(p)
    fig = Figure(figsize=(5.5, 3.5))
    plot_hypervolume(df, fig.add_subplot(111))
    p = out_dir / "hypervolume.png"
    save_figure(fig, p)
    out.append(p)
    return out
