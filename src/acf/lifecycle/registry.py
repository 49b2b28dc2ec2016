"""The model registry: every artifact (base, compressed model, adapter, student) with lineage, metrics and provenance.

One JSON file (`$ACF_HOME/registry.json`, `~/.acf` by default; `ACF_REGISTRY` or `--registry` override it) is
rewritten atomically under a file lock, and every change is appended to `registry.log.jsonl` beside it, so the
file is never half-written and the log says who changed what and when.

Promotion is guarded (the candidate must beat the active entry on a metric by a margin without regressing guard
metrics) because "active" is what a deployment would pick up; rollback walks back to the last entry that was
active and was not itself rolled back. Active state is kept per channel: adapters ("adapter") and whole models
("model") are promoted independently, since an adapter is applied on top of a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from acf import __version__
from acf.core.atomic import read_json_strict, validate_strict, write_text
from acf.core.objectives import DIRECTIONS
from acf.core.provenance import Measurement, git_commit
from acf.coordinator.state import load_frontier_file, now
from acf.methods.strategy import Strategy
from acf.models.facts import model_facts
from acf.models.gguf_file import is_gguf_dir, load_manifest

from acf.lifecycle.registry_model import (KINDS, REGISTRY_SCHEMA, ActiveEvent, Entry, PromotionRefused,
                                          RegistryError, RegistryFile, default_registry_path)


# ------------------------------------------------------------------------------------------- file handling


def _read(path: Path) -> RegistryFile:
    raw = read_json_strict(path, "corrupt registry", RegistryError)
    if not isinstance(raw, dict) or raw.get("schema_version") != REGISTRY_SCHEMA:
        ver = raw.get("schema_version") if isinstance(raw, dict) else None
        raise RegistryError(f"{path}: registry schema_version {ver!r}, this acf reads {REGISTRY_SCHEMA}; nothing was changed")
    return validate_strict(RegistryFile, raw, path, "corrupt registry", RegistryError)


class Registry:
    """An open registry. Mutations are collected and written (file + log) by `open_registry` on success."""

    def __init__(self, path: Path, data: RegistryFile):
        self.path, self.data = path, data
        self._log: list[dict] = []

    @property
    def log_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".log.jsonl")

    # ----------------------------------------------------------------------------------- lookups

    @property
    def entries(self) -> list[Entry]:
        return self.data.entries

    def get(self, ref: str) -> Entry:
        """By id, by exact name, by unique id prefix, or `active` / `active:adapter`."""
        if ref in ("active", "active:model", "active:adapter"):
            e = self.active(ref.split(":")[1] if ":" in ref else "model")
            if e is None:
                raise RegistryError(f"no active entry in channel {ref.split(':')[-1] if ':' in ref else 'model'} "
                                    f"(registry {self.path})")
            return e
        for e in self.entries:
            if e.id == ref:
                return e
        named = [e for e in self.entries if e.name == ref]
        if len(named) == 1:
            return named[0]
        pre = [e for e in self.entries if e.id.startswith(ref)]
        if len(pre) == 1:
            return pre[0]
        if len(named) + len(pre) > 1:
            raise RegistryError(f"{ref!r} is ambiguous: {', '.join(e.id for e in named + pre)}")
        raise RegistryError(f"no entry {ref!r} in registry {self.path}")

    def find_path(self, path: str | Path) -> Optional[Entry]:
        p = str(Path(path).expanduser().resolve())
        return next((e for e in self.entries if e.path == p), None)

    def active(self, channel: str = "model") -> Optional[Entry]:
        return next((e for e in self.entries if e.active and e.channel == channel), None)

    def children(self, eid: str) -> list[Entry]:
        return [e for e in self.entries if e.parent == eid]

    def ancestors(self, e: Entry) -> list[Entry]:
        out, seen = [], {e.id}
        while e.parent and e.parent not in seen:
            seen.add(e.parent)
            try:
                e = self.get(e.parent)
            except RegistryError:
                break
            out.append(e)
        return out

    def _record(self, op: str, eid: Optional[str], **details: Any) -> None:
        self._log.append({"at": now(), "op": op, "id": eid, "details": details, "acf_version": __version__})

    # ----------------------------------------------------------------------------------- adding

    def _new_id(self, kind: str, path: str) -> str:
        h = hashlib.sha1(f"{path}|{now()}|{len(self.entries)}".encode()).hexdigest()
        for n in range(6, 41):
            eid = f"{kind[:4]}-{h[:n]}"
            if not any(e.id == eid for e in self.entries):
                return eid
        raise RegistryError("could not make a unique id")  # pragma: no cover

    def add_entry(self, *, kind: str, path: str | Path, name: Optional[str] = None, parent: Optional[str] = None,
                  strategy: Optional[Strategy] = None, metrics: Optional[dict[str, Measurement]] = None,
                  tags: Optional[list[str]] = None, source: Optional[dict] = None) -> tuple[Entry, bool]:
        """Register an artifact; returns (entry, created). A path already registered returns its entry."""
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r}: choose from {', '.join(KINDS)}")
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise RegistryError(f"{p}: no such model directory")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise RegistryError(f"{p}: neither a model (config.json) nor an adapter (adapter_config.json) directory")
        old = self.find_path(p)
        if old is not None:
            return old, False
        par = self.get(parent) if parent else None
        if kind != "base" and par is None:
            raise RegistryError(f"a {kind} entry needs a parent (register its base model first, or pass --parent)")
        ms = dict(metrics or {})
        source = dict(source or {})
        if is_gguf_dir(p):
            # a GGUF artifact: its format, type and the runtime that measured it travel with the entry
            man = load_manifest(p)
            source.update(format="gguf", gguf_type=man.type, gguf_sha256=man.sha256, runtime="llama.cpp")
        if "size" not in ms:
            from acf.evaluation.perf import size_metric

            ms["size"] = size_metric(p)
        e = Entry(id=self._new_id(kind, str(p)), name=name or p.name, kind=kind, path=str(p),
                  parent=par.id if par else None,
                  base_model=(par.base_model or par.id) if par else None, strategy=strategy, metrics=ms,
                  git_commit=git_commit(), tags=list(tags or []), source=source)
        self.entries.append(e)
        self._record("add", e.id, kind=kind, path=e.path, parent=e.parent, name=e.name)
        return e, True

    def add_from_run(self, run_dir: str | Path, candidate_id: str, tags: Optional[list[str]] = None
                     ) -> tuple[Entry, Optional[Entry]]:
        """Register a run's candidate (`recommended` picks the run's pick) and, if missing, its base model.

        Returns (candidate entry, base entry newly created or None).
        """
        ff = load_frontier_file(run_dir)
        if candidate_id == "recommended":
            if ff.recommended is None:
                raise RegistryError(f"{run_dir}: the run has no recommended pick")
            candidate_id = ff.recommended.id
        try:
            c = ff.candidate(candidate_id)
        except KeyError:
            ids = ([ff.baseline.id] if ff.baseline else []) + [x.id for x in ff.candidates]
            raise RegistryError(f"{run_dir}: no candidate {candidate_id!r} (known: {', '.join(ids)})") from None
        src = {"run_dir": str(Path(run_dir).resolve()), "run_id": ff.run.run_id, "dataset": ff.run.dataset}
        base, base_new = self.find_path(ff.run.model_path), None
        if base is None:
            bm = ff.baseline.metrics if ff.baseline else {}
            base, created = self.add_entry(kind="base", path=ff.run.model_path, name=ff.run.model, metrics=bm,
                                           source={**src, "candidate_id": ff.baseline.id if ff.baseline else None})
            base_new = base if created else None
        is_baseline = ff.baseline is not None and c.id == ff.baseline.id
        if is_baseline:
            return base, base_new
        if c.status != "ok":
            raise RegistryError(f"candidate {c.id} has status {c.status} ({c.reason}); only ok candidates are registered")
        if not c.artifact or not Path(c.artifact).exists():
            raise RegistryError(f"candidate {c.id}: its model directory {c.artifact or '(none)'} no longer exists "
                                f"(the run kept only frontier artifacts?)")
        kind = "student" if any(s.method == "drop_layers" for s in c.strategy.steps) and \
            any(s.method in ("distill", "lora") for s in c.strategy.steps) else "compressed"
        e, _ = self.add_entry(kind=kind, path=c.artifact, name=f"{ff.run.run_id}/{c.id}", parent=base.id,
                              strategy=c.strategy, metrics=c.metrics, tags=tags,
                              source={**src, "candidate_id": c.id, "on_frontier": c.id in ff.frontier,
                                      "reward": c.reward, "retention": c.retention})
        return e, base_new

    # ----------------------------------------------------------------------------------- queries

    def list(self, kind: Optional[str] = None, base: Optional[str] = None, method: Optional[str] = None,
             bits: Optional[int] = None) -> list[Entry]:
        out = []
        base_id = self.get(base).id if base else None
        for e in self.entries:
            if kind and e.kind != kind:
                continue
            if base_id and not (e.id == base_id or e.base_model == base_id):
                continue
            steps = e.strategy.steps if e.strategy else []
            if method and not any(s.method == method for s in steps):
                continue
            if bits is not None and not any(s.params.get("bits") == bits for s in steps):
                continue
            out.append(e)
        return out

    def compare(self, a_ref: str, b_ref: str) -> dict[str, Any]:
        a, b = self.get(a_ref), self.get(b_ref)
        fa, fb = model_facts(Path(a.path)), model_facts(Path(b.path))
        for e, f in ((a, fa), (b, fb)):
            if e.value("params"):
                f["params"], f["params_how"] = e.value("params"), "measured at evaluation (logical parameters)"
            if e.value("bits_per_weight"):
                f["bits_per_weight"], f["bits_how"] = e.value("bits_per_weight"), "measured at evaluation"
        by_index = sorted(i for i in fa["layers"] if fb["layers"].get(i) == fa["layers"][i])
        a_by_hash: dict[str, int] = {}
        for i, h in sorted(fa["layers"].items()):
            a_by_hash.setdefault(h, i)
        b_from_a = {j: a_by_hash[h] for j, h in sorted(fb["layers"].items()) if h in a_by_hash}
        other_shared = sorted(k for k in fa["other"] if fb["other"].get(k) == fa["other"][k])
        deltas = {}
        for m in sorted(set(a.metrics) | set(b.metrics)):
            va, vb = a.value(m), b.value(m)
            d = (vb - va) if va is not None and vb is not None else None
            better = None
            if d is not None and m in DIRECTIONS and d != 0:
                better = "b" if (d > 0) == (DIRECTIONS[m] == "maximize") else "a"
            deltas[m] = {"a": va, "b": vb, "delta": d, "better": better}
        return {
            "a": {"id": a.id, "name": a.name, "kind": a.kind, "path": a.path, "parent": a.parent,
                  **{k: v for k, v in fa.items() if k not in ("layers", "other")}},
            "b": {"id": b.id, "name": b.name, "kind": b.kind, "path": b.path, "parent": b.parent,
                  **{k: v for k, v in fb.items() if k not in ("layers", "other")}},
            "lineage": ("b is a child of a" if b.parent == a.id else "a is a child of b" if a.parent == b.id
                        else "same base" if (a.base_model or a.id) == (b.base_model or b.id) else "unrelated"),
            "layers_a": len(fa["layers"]), "layers_b": len(fb["layers"]),
            "shared_layers_by_index": by_index,
            "shared_layers_by_hash": b_from_a,        # b's layer index -> identical layer index in a
            "shared_other_tensors": other_shared,
            "compression_ratio": (fa["size_bytes"] / fb["size_bytes"]) if fb["size_bytes"] else None,
            "metric_deltas": deltas,
        }

    # ----------------------------------------------------------------------------------- active state

    def set_active(self, e: Entry, action: str, reason: str = "") -> None:
        cur = self.active(e.channel)
        if cur is not None and cur.id != e.id:
            cur.active = False
            cur.active_history.append(ActiveEvent(at=now(), active=False, action="replaced", reason=f"by {e.id}"))
        e.active = True
        e.active_history.append(ActiveEvent(at=now(), active=True, action=action, reason=reason))
        self.data.active_stack.setdefault(e.channel, []).append(e.id)
        self._record(action, e.id, previous=cur.id if cur else None, reason=reason, channel=e.channel)

    def promote(self, ref: str, metric: str, margin: float = 0.0, guards: tuple[str, ...] = (),
                force: bool = False, reason: str = "", guard_tolerance: float = 0.0) -> Entry:
        """Make `ref` active if it beats the active entry on `metric` by `margin` without regressing `guards`."""
        e = self.get(ref)
        if force:
            if not reason.strip():
                raise RegistryError("--force needs --reason (it is recorded in the registry log)")
            self.set_active(e, "force", reason)
            return e
        for m in (metric, *guards):
            if m not in DIRECTIONS:
                raise RegistryError(f"unknown metric {m!r}: choose from {', '.join(DIRECTIONS)}")
        cur = self.active(e.channel)
        if cur is not None and cur.id == e.id:
            raise RegistryError(f"{e.id} is already active")
        if e.rolled_back:
            raise PromotionRefused([f"{e.id} was rolled back earlier; promote it with --force --reason if intended"])
        if e.value(metric) is None:
            raise PromotionRefused([f"{e.id} has no measured {metric}"])
        if cur is None:
            self.set_active(e, "promote", f"first active entry in channel {e.channel} ({metric}={e.value(metric):.6g})")
            return e
        reasons = []
        cv, av = e.value(metric), cur.value(metric)
        if av is None:
            reasons.append(f"active {cur.id} has no measured {metric} to compare with")
        else:
            gain = cv - av if DIRECTIONS[metric] == "maximize" else av - cv
            if gain < margin:
                reasons.append(f"{metric}: {cv:.6g} vs active {cur.id} {av:.6g} (gain {gain:+.6g} < margin {margin:g}; "
                               f"{DIRECTIONS[metric]})")
        for g in guards:
            gv, ga = e.value(g), cur.value(g)
            if gv is None or ga is None:
                reasons.append(f"guard {g}: not measured on {'both' if gv is None and ga is None else e.id if gv is None else cur.id}")
                continue
            worse = ga - gv if DIRECTIONS[g] == "maximize" else gv - ga
            if worse > guard_tolerance * abs(ga):
                reasons.append(f"guard {g} regresses: {gv:.6g} vs active {ga:.6g}")
        if reasons:
            raise PromotionRefused(reasons)
        self.set_active(e, "promote", f"{metric} {cv:.6g} vs {av:.6g} (margin {margin:g})"
                        + (f"; guards ok: {','.join(guards)}" if guards else ""))
        return e

    def rollback(self, channel: str = "model", to: Optional[str] = None) -> tuple[Entry, Optional[Entry]]:
        """Restore the previous good active entry (or `to`); the current one is marked rolled back."""
        cur = self.active(channel)
        if to is not None:
            target = self.get(to)
            if target.channel != channel:
                raise RegistryError(f"{target.id} is a {target.kind}, not in channel {channel}")
            if cur is not None and target.id == cur.id:
                raise RegistryError(f"{target.id} is already active")
            if not Path(target.path).exists():
                raise RegistryError(f"{target.id}: its files {target.path} no longer exist")
        else:
            ids = {e.id for e in self.entries}
            target = None
            for eid in reversed(self.data.active_stack.get(channel, [])):
                if eid in ids and (cur is None or eid != cur.id):
                    t = self.get(eid)
                    if not t.rolled_back and Path(t.path).exists():
                        target = t
                        break
            if target is None:
                raise RegistryError(f"nothing to roll back to in channel {channel}: no earlier good active entry")
        if cur is not None:
            cur.rolled_back = True
        self.set_active(target, "rollback", f"rolled back from {cur.id}" if cur else "restored")
        return target, cur

    def prune(self, keep: int, kinds: tuple[str, ...] = ("compressed", "adapter", "student"),
              delete_artifacts: bool = False) -> list[Entry]:
        """Drop all but the newest `keep` non-active entries of `kinds`; never the active ones or their ancestors."""
        if keep < 0:
            raise RegistryError("--keep must be >= 0")
        pool = sorted((e for e in self.entries if e.kind in kinds and not e.active), key=lambda e: e.created_at)
        kept = pool[len(pool) - keep:] if keep else []
        protected = {e.id for e in self.entries if e.active} | {e.id for e in kept}
        for e in list(self.entries):
            if e.id in protected:
                protected |= {a.id for a in self.ancestors(e)}
        gone = [e for e in pool if e.id not in protected]
        gone_ids = {e.id for e in gone}
        self.data.entries = [e for e in self.entries if e.id not in gone_ids]
        for ch, stack in self.data.active_stack.items():
            self.data.active_stack[ch] = [i for i in stack if i not in gone_ids]
        for e in gone:
            deleted = False
            if delete_artifacts and Path(e.path).exists():
                shutil.rmtree(e.path, ignore_errors=True)
                deleted = True
            self._record("prune", e.id, path=e.path, files_deleted=deleted)
        return gone


@contextlib.contextmanager
def open_registry(path: Optional[str | Path] = None, *, create: bool = False, write: bool = True) -> Iterator[Registry]:
    """Open (and with `write`, lock and save on success) a registry; refuse a missing or corrupt one by name.

    `create` allows a missing file (`add` makes it). A command that fails part way writes nothing.
    """
    path = Path(path).expanduser() if path else default_registry_path()
    if not path.exists() and not create:
        raise RegistryError(f"{path}: no registry file (register a model first with `acf registry add` or "
                            f"`acf registry add-model`); nothing was changed")
    if not write:
        yield Registry(path, _read(path))
        return
    if path.exists():
        _read(path)          # refuse a corrupt file before creating anything next to it
    path.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reg = Registry(path, _read(path) if path.exists() else RegistryFile())
        yield reg
        if reg._log or not path.exists():
            write_text(path, reg.data.model_dump_json(indent=2))
            with open(reg.log_path, "a", encoding="utf-8") as f:
                for rec in reg._log:
                    f.write(json.dumps({**rec, "registry": str(path)}, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
