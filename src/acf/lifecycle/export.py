"""`acf export`: a run's candidate as a folder to hand on: its model (the compressed-tensors / HF folder, or the GGUF
file), a model card with the run's figures (README.md, acf.lifecycle.export_card), an Ollama Modelfile for a GGUF,
and export.json (the candidate's full record and the source run) for provenance.

The folder is written into a temporary sibling and renamed into place, so a folder under the asked name is
complete; a non-empty one is replaced only with `force`. Only models the run kept can be exported: episode
candidates and fixed recipes whose folder still exists (a run keeps the frontier's, and acf's best at each recipe
size; `--keep-all` keeps every one).
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from acf import __version__
from acf.coordinator.state import Candidate, FrontierFile, load_frontier_file, now
from acf.core.atomic import atomic_dir, make_readable, sha256_file, write_json, write_text
from acf.core.errors import AcfError
from acf.core.provenance import git_commit
from acf.lifecycle.export_card import card_text, modelfile_text
from acf.models.gguf_file import GGUF_NAME, MANIFEST_NAME, is_gguf_dir, load_manifest

EXPORT_SCHEMA = 1


@dataclass(frozen=True)
class Exported:
    out: Path
    candidate: str
    fmt: str
    files: list[str]


def artifact_dir(c: Candidate, run_dir: Path) -> Optional[Path]:
    """The candidate's model folder if it still exists. A relative path was relative to where the run was started,
    and a run directory may have moved since, so `RUN_DIR/artifacts/<id>` (where a run keeps models) is tried too."""
    if not c.artifact:
        return None
    p = Path(c.artifact).expanduser()
    tries = [p] if p.is_absolute() else [p, run_dir / p]
    tries.append(run_dir / "artifacts" / c.id)
    return next((t.resolve() for t in tries if t.is_dir()), None)


def kept_models(ff: FrontierFile, run_dir: Path) -> dict[str, Path]:
    """Candidate id -> model folder, for every measured episode candidate and fixed recipe whose model was kept."""
    out: dict[str, Path] = {}
    for c in ff.candidates + ff.recipes:
        d = artifact_dir(c, run_dir) if c.status == "ok" else None
        if d is not None:
            out[c.id] = d
    return out


def pick(ff: FrontierFile, run_dir: Path, cid: Optional[str]) -> tuple[Candidate, Path]:
    """The candidate to export (default: the run's recommended pick) and its folder; AcfError (one line naming the
    kept ones) for an unknown id or a model that was not kept."""
    kept = kept_models(ff, run_dir)
    names = ", ".join(kept) or "none"
    if cid is None:
        if ff.recommended is None:
            raise AcfError(f"{run_dir}: the run has no recommended pick; name a candidate (kept: {names})")
        cid = ff.recommended.id
    if cid not in kept:
        try:
            c = ff.candidate(cid)
        except KeyError:
            raise AcfError(f"{run_dir}: no candidate {cid!r}; candidates with a kept model: {names}") from None
        why = ("is the uncompressed baseline" if ff.baseline is not None and c.id == ff.baseline.id
               else f"has status {c.status}" if c.status != "ok"
               else "is a control row (baseline + recovery), not a compressed model" if c in ff.controls
               else "has no kept model (a run keeps the frontier's and acf's best at each recipe size; "
                    "--keep-all keeps every one)")
        raise AcfError(f"{run_dir}: candidate {cid!r} {why}; candidates with a kept model: {names}")
    return ff.candidate(cid), kept[cid]


def model_format(folder: Path) -> str:
    """gguf, compressed-tensors, bitsandbytes or safetensors (a plain 16/32-bit HF folder)."""
    from acf.methods.model_io import quant_method

    if is_gguf_dir(folder):
        return "gguf"
    qm = quant_method(folder)
    return qm if qm in ("compressed-tensors", "bitsandbytes") else "safetensors"


def chat_template(folder: Path) -> Optional[str]:
    """The model's Jinja chat template from its tokenizer files (a GGUF candidate keeps them beside the file)."""
    import json

    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    try:
        t = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    return t if isinstance(t, str) else None


def gguf_file_name(ff: FrontierFile, cid: str) -> str:
    """`<model>-<candidate>.gguf`: a name that still says what it is once the file leaves its folder."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(ff.run.model).name)
    return f"{stem}-{cid.replace(':', '-')}.gguf"


def _check_target(out: Path, src: Path, run_dir: Path, force: bool) -> None:
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise AcfError(f"--out {out}: is a file, not a folder")
    for p in (src, run_dir.resolve()):
        if out == p or p.is_relative_to(out) or out.is_relative_to(src):
            raise AcfError(f"--out {out}: overlaps the source {p}; choose a folder outside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AcfError(f"--out {out} exists and is not empty: choose a new folder, or --force to replace it")


def export_candidate(run_dir: str | Path, cid: Optional[str], out: str | Path, force: bool = False) -> Exported:
    """Copy candidate `cid` (default: the recommended pick) of the run in `run_dir` into `out` with its card."""
    run_dir, out = Path(run_dir), Path(out).expanduser()
    ff = load_frontier_file(run_dir)
    c, src = pick(ff, run_dir, cid)
    _check_target(out, src, run_dir, force)
    fmt = model_format(src)
    weights, llama_v, gtype = None, "", ""
    with atomic_dir(out.resolve()) as tmp:
        if fmt == "gguf":
            man = load_manifest(src)
            weights, llama_v, gtype = gguf_file_name(ff, c.id), man.llama_cpp_python, man.type
            shutil.copy2(src / GGUF_NAME, tmp / weights)
            shutil.copy2(src / MANIFEST_NAME, tmp / MANIFEST_NAME)
            if man.sha256 and sha256_file(tmp / weights) != man.sha256:
                raise AcfError(f"{src / GGUF_NAME}: its sha256 is not the one its manifest recorded when it was "
                               f"measured; not exported")
            write_text(tmp / "Modelfile", modelfile_text(weights, chat_template(src)))
        else:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        card = card_text(ff, c.id, fmt=fmt, folder=out.name, weights=weights,
                         exporter=(__version__, git_commit()), llama_cpp_python=llama_v, gguf_type=gtype,
                         vllm_installed=importlib.util.find_spec("vllm") is not None)
        write_text(tmp / "README.md", card)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + ["export.json"]
        write_json(tmp / "export.json", {
            "export_schema": EXPORT_SCHEMA, "exported_at": now(), "acf_version": __version__,
            "git_commit": git_commit(), "source_run": str(run_dir.resolve()), "run_id": ff.run.run_id,
            "source_model": str(src), "format": fmt, "weights": weights, "files": sorted(files),
            "candidate": c.model_dump(mode="json")})
        make_readable(tmp)
    return Exported(out=out.resolve(), candidate=c.id, fmt=fmt, files=sorted(files))
