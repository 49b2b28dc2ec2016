"""eval: base vs adapted on the held-out rows and guard rows, with pluggable scorers."""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel

from acf.coordinator.state import now
from acf.core.atomic import write_text
from acf.core.errors import AcfError, DataError
from acf.core.provenance import device_string, runtime_string
from acf.lifecycle.dataset import load_dataset, read_rows, row_field
from acf.lifecycle.registry import open_registry
from acf.lifecycle.training import load_base, prompt_text
from acf.models.loading import free, resolve_device
from acf.tasks.gsm8k import extract_answer


_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_text(s: str) -> list[str]:
    s = (s or "").lower().translate(_PUNCT)
    return [w for w in s.split() if w not in ("a", "an", "the")]


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 over normalised tokens (lowercase, no punctuation or articles)."""
    p, r = normalise_text(pred), normalise_text(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def exact_numeric(pred: str, ref: str) -> float:
    """GSM8K-style: the final number of the prediction equals the reference's (after '####' if present)."""
    want = extract_answer(ref)
    return float(want is not None and extract_answer(pred) == want)


def contains(pred: str, ref: str) -> float:
    """The normalised reference appears in the normalised prediction (e.g. a required refusal phrase)."""
    return float(" ".join(normalise_text(ref)) in " ".join(normalise_text(pred)))


SCORERS: dict[str, Callable[[str, str], float]] = {"exact": exact_numeric, "f1": token_f1, "contains": contains}


def register_scorer(name: str, fn: Callable[[str, str], float]) -> None:
    """Plug in a scorer (prediction, reference) -> [0, 1]; name it in --scorer or an eval CSV's scorer column."""
    SCORERS[name] = fn


def auto_scorer(ref: str) -> str:
    """Numeric references (a bare number, or GSM8K '#### N') are exact-matched; free text gets token F1."""
    r = (ref or "").strip()
    return "exact" if "####" in r or re.fullmatch(r"-?\$?\d[\d,]*(?:\.\d+)?", r) else "f1"


def score(pred: str, ref: str, scorer: str = "auto") -> tuple[float, str]:
    name = auto_scorer(ref) if scorer == "auto" else scorer
    if name not in SCORERS:
        raise AcfError(f"unknown scorer {name!r}: choose from auto, {', '.join(SCORERS)}")
    return SCORERS[name](pred, ref), name


def _generate(model, tok, prompts: list[str], max_new_tokens: int, device: str, batch_size: int = 8) -> list[str]:
    import torch

    outs = []
    tok.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        texts = [prompt_text(tok, p) for p in prompts[i:i + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outs


class EvalGroup(BaseModel):
    group: str
    n: int
    base: float
    adapted: float
    delta: float


class AdapterEval(BaseModel):
    adapter_dir: str
    base_model: str
    at: str
    device: str
    runtime: str
    scorer: str
    max_new_tokens: int
    groups: list[EvalGroup]
    rows: list[dict[str, Any]]
    seconds: float

    def group(self, name: str) -> Optional[EvalGroup]:
        return next((g for g in self.groups if g.group == name), None)


def resolve_adapter_dir(ref: str | Path, registry_path=None) -> Path:
    p = Path(ref).expanduser()
    if (p / "adapter_config.json").is_file():
        return p.resolve()

    with open_registry(registry_path, write=False) as reg:
        e = reg.get(str(ref))
    if e.kind != "adapter":
        raise AcfError(f"{e.id} is a {e.kind}, not an adapter")
    return Path(e.path)


def evaluate_adapter(adapter: str | Path, eval_csv: Optional[str | Path] = None, scorer: str = "auto",
                     max_new_tokens: int = 128, device: Optional[str] = None, registry_path=None,
                     log: Callable[[str], None] = print) -> AdapterEval:
    """Score base vs adapted on the adapter's held-out rows and on guard rows; save eval.json in the adapter dir.

    The base is the same loaded model with the adapter disabled, so both sides see identical weights otherwise.
    """
    from peft import PeftModel

    adir = resolve_adapter_dir(adapter, registry_path)
    meta = json.loads((adir / "metrics.json").read_text()) if (adir / "metrics.json").is_file() else None
    if meta is None or not (adir / "split.json").is_file():
        raise AcfError(f"{adir}: no metrics.json/split.json (not an adapter made by `acf distill train`)")
    split = json.loads((adir / "split.json").read_text())
    rows = load_dataset(meta["dataset"])
    held_ids = set(split["heldout_ids"])
    items = [{"group": "heldout", "prompt": r["prompt"], "reference": str(r["answer"]), "scorer": scorer}
             for r in rows if r["id"] in held_ids]
    if not items:
        raise AcfError(f"{meta['dataset']}: none of the adapter's held-out rows are in the dataset any more")
    if eval_csv is not None:
        for i, r in enumerate(read_rows(eval_csv), 1):
            p = row_field(r, "prompt")
            ref = r.get("expected") or r.get("reference") or row_field(r, "answer")
            if not p or ref is None:
                raise DataError(f"{eval_csv}: row {i} needs prompt and expected (or answer/reference)")
            items.append({"group": f"guard:{(r.get('category') or 'guard').strip()}", "prompt": p,
                          "reference": str(ref), "scorer": (r.get("scorer") or scorer).strip()})
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model, tok = load_base(Path(meta["base_model"]), meta.get("adapter_type", "lora"), dev, training=False)
    model = PeftModel.from_pretrained(model, str(adir))
    model.eval()
    prompts = [it["prompt"] for it in items]
    log(f"generating {len(prompts)} answers with the adapter and {len(prompts)} without")
    adapted = _generate(model, tok, prompts, max_new_tokens, dev)
    with model.disable_adapter():
        based = _generate(model, tok, prompts, max_new_tokens, dev)
    free(model)
    out_rows = []
    for it, b, a in zip(items, based, adapted):
        sb, name = score(b, it["reference"], it["scorer"])
        sa, _ = score(a, it["reference"], it["scorer"])
        out_rows.append({**it, "scorer": name, "base_output": b, "adapted_output": a, "base_score": sb,
                         "adapted_score": sa})
    groups = []
    for g in dict.fromkeys(r["group"] for r in out_rows):
        rs = [r for r in out_rows if r["group"] == g]
        bm = sum(r["base_score"] for r in rs) / len(rs)
        am = sum(r["adapted_score"] for r in rs) / len(rs)
        groups.append(EvalGroup(group=g, n=len(rs), base=round(bm, 6), adapted=round(am, 6), delta=round(am - bm, 6)))
    res = AdapterEval(adapter_dir=str(adir), base_model=meta["base_model"], at=now(), device=device_string(dev),
                      runtime=runtime_string(), scorer=scorer, max_new_tokens=max_new_tokens, groups=groups,
                      rows=out_rows, seconds=round(time.perf_counter() - t0, 3))
    write_text(adir / "eval.json", res.model_dump_json(indent=2))
    return res


def eval_table(res: AdapterEval) -> str:
    lines = [f"{'group':<24} {'n':>4} {'base':>8} {'adapted':>8} {'delta':>8}"]
    for g in res.groups:
        lines.append(f"{g.group:<24} {g.n:>4} {g.base:>8.3f} {g.adapted:>8.3f} {g.delta:>+8.3f}")
    return "\n".join(lines)
