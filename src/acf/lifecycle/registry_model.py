"""What the model registry stores (acf.lifecycle.registry): its entries, the file's schema, its errors and where it lives.
Kept apart from the registry's operations so readers of registry.json (reports, tools) need no lifecycle code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from acf import __version__
from acf.core.errors import AcfError
from acf.core.provenance import Measurement
from acf.coordinator.state import now
from acf.methods.strategy import Strategy

REGISTRY_SCHEMA = 1
Kind = Literal["base", "compressed", "adapter", "student"]
KINDS: tuple[str, ...] = ("base", "compressed", "adapter", "student")


class RegistryError(AcfError):
    """Missing or corrupt registry, unknown entry, or a refused change."""


class PromotionRefused(RegistryError):
    """The candidate does not beat the active entry (or regresses a guard); carries every reason."""

    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("promotion refused: " + "; ".join(reasons))


def acf_home() -> Path:
    return Path(os.environ.get("ACF_HOME") or Path.home() / ".acf").expanduser()


def default_registry_path() -> Path:
    return Path(os.environ.get("ACF_REGISTRY") or acf_home() / "registry.json").expanduser()


class ActiveEvent(BaseModel):
    at: str
    active: bool
    action: str                 # promote | force | rollback | replaced
    reason: str = ""


class Entry(BaseModel):
    id: str
    name: str
    kind: Kind
    path: str
    parent: Optional[str] = None
    base_model: Optional[str] = None          # id of the root base model of the lineage
    strategy: Optional[Strategy] = None
    metrics: dict[str, Measurement] = Field(default_factory=dict)
    acf_version: str = __version__
    git_commit: Optional[str] = None
    created_at: str = Field(default_factory=now)
    tags: list[str] = Field(default_factory=list)
    active: bool = False
    rolled_back: bool = False                 # stepped away from by a rollback: not a "good" target any more
    active_history: list[ActiveEvent] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)   # run dir / candidate id / training config ...

    @property
    def channel(self) -> str:
        return "adapter" if self.kind == "adapter" else "model"

    def value(self, metric: str) -> Optional[float]:
        m = self.metrics.get(metric)
        return None if m is None else m.value


class RegistryFile(BaseModel):
    schema_version: int = REGISTRY_SCHEMA
    entries: list[Entry] = Field(default_factory=list)
    active_stack: dict[str, list[str]] = Field(default_factory=dict)   # channel -> ids in promotion order
