"""The planner's structured answer (Proposal), the Rejected outcome, and parsing an answer given as text."""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from pydantic import BaseModel, Field, ValidationError


class ProposedStep(BaseModel):
    method: str = Field(description="one of the allowed methods")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters; omitted ones take defaults")


class ProposedStrategy(BaseModel):
    steps: list[ProposedStep] = Field(description="ordered steps: prune -> distill/lora -> quantize")


class Proposal(BaseModel):
    """What the planner must answer: a strategy, why, and which objective it targets."""

    strategy: ProposedStrategy
    rationale: str = Field(description="why this strategy, given the history and the frontier (1-3 sentences)")
    objective: str = Field("", description="the objective or trade-off this proposal aims at")


class Rejected(Exception):
    """A planner turn that produced no usable proposal; `kind` is a short machine-readable class."""

    def __init__(self, kind: str, reason: str, raw: str = ""):
        self.kind, self.reason, self.raw = kind, reason, raw
        super().__init__(f"{kind}: {reason}")


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def parse_proposal_text(text: str) -> Proposal:
    """The first JSON object in `text` (code fences stripped) that is a Proposal; Rejected('malformed') otherwise."""
    if not text or not text.strip():
        raise Rejected("malformed", "empty answer", text or "")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    dec = json.JSONDecoder()
    objs: list[Any] = []
    bad_json: Optional[ValueError] = None
    for chunk in candidates:
        first = True
        for i, ch in enumerate(chunk):
            if ch != "{":
                continue
            try:
                obj, _ = dec.raw_decode(chunk[i:])
            except ValueError as e:   # an outermost object that does not parse is what the model meant
                if first and bad_json is None:
                    bad_json = e
                first = False
                continue
            objs.append(obj)
            break   # the outermost object starting here; nested ones are part of it
    last: Optional[Rejected] = None
    for obj in objs:
        try:
            return proposal_from_obj(obj, text)
        except Rejected as r:
            last = r
    if bad_json is not None:
        raise Rejected("malformed", f"bad JSON: {getattr(bad_json, 'msg', bad_json)}", text)
    if last is not None:
        raise last
    raise Rejected("malformed", "not a proposal: the answer contains no JSON object", text)


def proposal_from_obj(obj: Any, raw: str) -> Proposal:
    if not isinstance(obj, dict) or "strategy" not in obj:
        keys = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise Rejected("malformed", f"not a proposal: expected keys strategy, rationale, objective (got {keys})", raw)
    st = obj["strategy"]
    if isinstance(st, list):   # a bare list of steps is an unambiguous strategy
        obj = {**obj, "strategy": {"steps": st}}
    try:
        return Proposal.model_validate(obj)
    except ValidationError as e:
        er = e.errors()[0]
        loc = ".".join(str(x) for x in er.get("loc", ()))
        raise Rejected("malformed", f"not a proposal: {loc}: {er.get('msg')}", raw) from None


def message_text(msg) -> str:
    c = getattr(msg, "content", msg)
    if isinstance(c, list):   # content blocks
        return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in c)
    return c if isinstance(c, str) else str(c)
