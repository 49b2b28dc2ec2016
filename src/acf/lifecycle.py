"""The adapter loop for a personal/task model: collect good pairs -> train a LoRA/QLoRA adapter -> eval -> promote.

- collect: keeps {prompt, answer} rows whose score >= threshold and that a person approved, drops duplicates
  (also against what the dataset already holds, so it only grows), refuses rows carrying secret-looking strings
  (a training set is the worst place for a leaked key: the model may learn to repeat it), records stats.
- train: a real PEFT LoRA (or QLoRA on a bitsandbytes 4-bit base) from a strict JSON config, capped in steps and
  minutes; the adapter is saved unmerged under output_dir/<date-time>/ with metrics and a loss curve.
- eval: base vs adapted on the held-out 20% (chosen by a hash of each row, so a row never moves between
  train and held-out as the dataset grows) plus guard rows (safety/format) from a CSV, with a pluggable scorer.
- promote: only if the adapter wins by >= 0.05 on average and no guard category regresses; recorded in the
  registry (channel "adapter"); rollback restores an earlier adapter and keeps the last 3.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import string
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .atomic import atomic_dir, read_json_strict, write_json, write_text
from .errors import AcfError, DataError
from .provenance import Measurement, device_string, git_commit, runtime_string
from .state import now

# ------------------------------------------------------------------------------------------------ secrets

SECRET_PATTERNS: dict[str, re.Pattern] = {
    "openai/anthropic-style key (sk-...)": re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}"),
    "GitHub token (ghp_/gho_/ghs_/...)": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    "AWS access key id (AKIA...)": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "Slack token (xox...)": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Bearer token": re.compile(r"\bBearer\s+[A-Za-z0-9\-._~+/]{16,}=*"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Google API key (AIza...)": re.compile(r"\bAIza[0-9A-Za-z\-_]{35}\b"),
    "long hex/base64 value after key=": re.compile(
        r"(?i)\b[\w-]*(?:key|secret|token|passw(?:or)?d|pwd|auth|credential)[\w-]*\s*[=:]\s*['\"]?"
        r"(?:[A-Fa-f0-9]{20,}|[A-Za-z0-9+/_\-]{24,}={0,2})"),
}


def find_secrets(text: str) -> list[str]:
    """Names of the secret patterns found in `text` (never the secret itself, so logs stay clean)."""
    return [name for name, pat in SECRET_PATTERNS.items() if pat.search(text or "")]


# ------------------------------------------------------------------------------------------------ collect

_ALIASES = {"prompt": ("prompt", "input", "question", "instruction"),
            "answer": ("answer", "output", "response", "completion"),
            "score": ("score", "rating", "reward"),
            "approved": ("approved", "approval", "accepted"),
            "id": ("id", "run_id")}
_TRUE = {"true", "1", "yes", "y", "approved", "t"}


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv or .jsonl file (refused by name when unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suf = path.suffix.lower()
    try:
        if suf == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if suf in (".jsonl", ".ndjson"):
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}:{i}: each line must be a JSON object")
                    rows.append(obj)
            return rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    raise DataError(f"{path}: expected a .csv or .jsonl file")


def _field(row: dict, name: str) -> Any:
    for k in _ALIASES[name]:
        if k in row and row[k] not in (None, ""):
            return row[k]
    return None


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def row_key(prompt: str, answer: str) -> str:
    """Dedup key: whitespace-normalised prompt and answer (case kept: case can matter for answers)."""
    return hashlib.sha256(f"{_norm(prompt)}\x00{_norm(answer)}".encode()).hexdigest()[:16]


class CollectStats(BaseModel):
    at: str
    runs_file: str
    eval_file: Optional[str] = None
    min_score: float
    rows_read: int = 0
    kept: int = 0
    missing_fields: int = 0
    below_min_score: int = 0
    not_approved: int = 0
    duplicates_in_batch: int = 0
    already_in_dataset: int = 0
    secrets_refused: int = 0
    secret_rows: list[dict[str, Any]] = Field(default_factory=list)   # {row, patterns}: never the text itself
    secrets_allowed: bool = False
    dataset_rows_before: int = 0
    dataset_rows_after: int = 0


def stats_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.stem + ".stats.json")


def _apply_eval(rows: list[dict], eval_rows: list[dict], eval_file: Path) -> None:
    """Scores/approvals from an eval file override the runs file's, joined on id (or on the prompt)."""
    by_id = {str(_field(r, "id")): r for r in eval_rows if _field(r, "id") is not None}
    by_prompt = {_norm(_field(r, "prompt")): r for r in eval_rows if _field(r, "prompt") is not None}
    if not by_id and not by_prompt:
        raise DataError(f"{eval_file}: needs an 'id' or 'prompt' column to join on, plus 'score' and/or 'approved'")
    for r in rows:
        rid, p = _field(r, "id"), _field(r, "prompt")
        ev = by_id.get(str(rid)) if rid is not None else None
        if ev is None and p is not None:
            ev = by_prompt.get(_norm(p))
        if ev is not None:
            for k in ("score", "approved"):
                v = _field(ev, k)
                if v is not None:
                    r[k] = v


def collect(runs: str | Path, out: str | Path, eval_file: Optional[str | Path] = None, min_score: float = 0.7,
            allow_secrets: bool = False) -> CollectStats:
    """Append good, approved, new, secret-free {prompt, answer} rows to `out`; write stats beside it."""
    runs, out = Path(runs), Path(out)
    rows = read_rows(runs)
    if eval_file is not None:
        _apply_eval(rows, read_rows(eval_file), Path(eval_file))
    existing = read_rows(out) if out.exists() else []
    have = {r.get("key") or row_key(r.get("prompt", ""), r.get("answer", "")) for r in existing}
    st = CollectStats(at=now(), runs_file=str(runs.resolve()), eval_file=str(Path(eval_file).resolve()) if eval_file
                      else None, min_score=min_score, rows_read=len(rows), secrets_allowed=allow_secrets,
                      dataset_rows_before=len(existing))
    new: list[dict] = []
    seen: set[str] = set()
    for i, r in enumerate(rows, 1):
        prompt, answer, score = _field(r, "prompt"), _field(r, "answer"), _field(r, "score")
        if prompt is None or answer is None or score is None:
            st.missing_fields += 1
            continue
        hits = find_secrets(f"{prompt}\n{answer}")
        if hits and not allow_secrets:
            st.secrets_refused += 1
            st.secret_rows.append({"row": i, "patterns": hits})
            continue
        try:
            s = float(score)
        except (TypeError, ValueError):
            st.missing_fields += 1
            continue
        if not s >= min_score:
            st.below_min_score += 1
            continue
        if str(_field(r, "approved") or "").strip().lower() not in _TRUE and _field(r, "approved") is not True:
            st.not_approved += 1
            continue
        key = row_key(prompt, answer)
        if key in seen:
            st.duplicates_in_batch += 1
            continue
        if key in have:
            st.already_in_dataset += 1
            continue
        seen.add(key)
        new.append({"id": key, "key": key, "prompt": str(prompt), "answer": str(answer), "score": s,
                    "source": runs.name, "source_id": _field(r, "id"), "added_at": st.at})
    if not new:
        raise DataError(f"no rows passed from {runs} ({st.rows_read} read: {st.below_min_score} below score "
                        f"{min_score}, {st.not_approved} not approved, {st.already_in_dataset} already in the "
                        f"dataset, {st.duplicates_in_batch} duplicates, {st.secrets_refused} with secrets, "
                        f"{st.missing_fields} missing prompt/answer/score); {out} was not changed")
    st.kept = len(new)
    st.dataset_rows_after = len(existing) + len(new)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    if text and not text.endswith("\n"):
        text += "\n"
    write_text(out, text + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
    sp = stats_path(out)
    hist = []
    if sp.exists():
        try:
            hist = json.loads(sp.read_text()).get("collections", [])
        except (OSError, ValueError):
            hist = []
    write_json(sp, {"dataset": str(out.resolve()), "rows": st.dataset_rows_after, "collections": hist + [st.model_dump()]})
    return st


# ------------------------------------------------------------------------------------------------ dataset split


def load_dataset(path: str | Path) -> list[dict]:
    rows = read_rows(path)
    bad = [i for i, r in enumerate(rows, 1) if not r.get("prompt") or r.get("answer") in (None, "")]
    if bad:
        raise DataError(f"{path}: rows {bad[:5]} lack prompt/answer (make it with `acf distill collect`)")
    for r in rows:
        r.setdefault("id", row_key(r["prompt"], r["answer"]))
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def split_rows(rows: list[dict], holdout: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, held-out). A row is held out when its id hashes below `holdout`: stable as the dataset grows.

    Small datasets where the hash rule gives an empty side fall back to the lowest-hash ceil(holdout * n) rows.
    """
    def frac(r: dict) -> float:
        return int(hashlib.sha256(str(r["id"]).encode()).hexdigest()[:8], 16) / 16 ** 8

    held = [r for r in rows if frac(r) < holdout]
    if not held or len(held) == len(rows):
        k = min(max(1, math.ceil(holdout * len(rows))), len(rows) - 1)
        order = sorted(rows, key=frac)
        held = order[:k]
    ids = {r["id"] for r in held}
    return [r for r in rows if r["id"] not in ids], held


# ------------------------------------------------------------------------------------------------ train


class TrainConfig(BaseModel):
    """The `acf distill train --config` file. Unknown keys are errors: a typo must not silently use a default."""

    model_config = ConfigDict(extra="forbid")
    base_model: str = "smollm2-135m"
    adapter_type: Literal["lora", "qlora"] = "lora"
    train_steps: int = Field(500, gt=0, le=100000)
    max_train_minutes: float = Field(30.0, gt=0)
    batch_size: int = Field(4, ge=1, le=512)
    lr: float = Field(2e-4, gt=0, lt=1)
    eval_steps: int = Field(50, ge=1)
    output_dir: str = "adapters"
    dataset: str = "distill_dataset.jsonl"
    rank: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    seq_len: int = Field(512, ge=16, le=8192)
    holdout: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    device: str = "auto"


def load_train_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    raw = read_json_strict(path, None, missing="no such config file", unchanged=False)
    if not isinstance(raw, dict):
        raise AcfError(f"{path}: the config must be a JSON object")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        probs = []
        for er in e.errors():
            loc = ".".join(map(str, er["loc"]))
            if er["type"] == "extra_forbidden":
                probs.append(f"unknown key {loc!r} (allowed: {', '.join(TrainConfig.model_fields)})")
            else:
                probs.append(f"{loc}: {er['msg']}")
        raise AcfError(f"{path}: " + "; ".join(probs)) from None


def _prompt_text(tok, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return f"Question: {prompt}\nAnswer:"


def _examples(tok, rows: list[dict], seq_len: int):
    from .methods.calibration import TrainExample

    out = []
    eos = tok.eos_token or ""
    for r in rows:
        p = tok(_prompt_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        a = tok(str(r["answer"]) + eos, add_special_tokens=False)["input_ids"]
        ids, labels = (p + a)[:seq_len], ([-100] * len(p) + a)[:seq_len]
        if any(x != -100 for x in labels[1:]):
            out.append(TrainExample(ids, labels))
    return out


def _load_base(base: Path, adapter_type: str, device: str, training: bool = True):
    """Base model for LoRA (full precision) or QLoRA (bitsandbytes NF4 4-bit, frozen).

    Evaluation loads a QLoRA adapter's base in 4-bit too: the adapter was fitted to the quantized weights.
    """
    from .models import load_model, load_tokenizer

    if adapter_type == "lora":
        return load_model(base, device)
    try:
        import bitsandbytes  # noqa: F401

        from .methods.lora import load_kbit   # the qlora method's loader: one 4-bit loading path

        model = load_kbit(base, device, quantize_nf4=True, training=training)
    except Exception as e:  # noqa: BLE001 - any library failure means the same to the user
        raise AcfError(f"qlora cannot run on {device}: bitsandbytes 4-bit loading failed "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use adapter_type lora") from None
    model.eval()
    return model, load_tokenizer(base)


def _plot_losses(path: Path, train: list[float], evals: list[tuple[int, float]], title: str) -> None:
    from matplotlib.figure import Figure

    from .report import save_figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(111)
    ax.plot(range(1, len(train) + 1), train, label="train loss (batch)", alpha=0.8)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _answer_loss(model, b: dict, causal_ce):
    """Next-token CE on answer tokens only, projecting just those positions through the LM head.

    With a 49k vocabulary the full logits tensor dominates a small model's step time and memory, and prompt
    positions carry no loss, so only the labelled positions are projected. Falls back to full logits for
    architectures without a separate decoder/output embedding.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dec = getattr(base, "get_decoder", lambda: None)()
    head = base.get_output_embeddings()
    if dec is None or head is None or getattr(base.config, "final_logit_softcapping", None):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        return causal_ce(out.logits, b["labels"])
    h = dec(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).last_hidden_state
    labels = b["labels"][:, 1:]
    mask = labels != -100
    logits = head(h[:, :-1][mask])
    return torch.nn.functional.cross_entropy(logits.float(), labels[mask])


class TrainResult(BaseModel):
    adapter_dir: str
    registry_id: Optional[str] = None
    steps_done: int
    stopped_because: str
    metrics: dict[str, Any]


def train(config: str | Path | TrainConfig, registry_path: Optional[str | Path] = None, register: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA/QLoRA adapter per the config; save it under output_dir/<date-time>/ and register it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .methods._train import NonFiniteLoss, adamw_steps, causal_ce, eval_loss
    from .models import free, resolve_device, resolve_model

    cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
    device = resolve_device(cfg.device)
    base = resolve_model(cfg.base_model)
    rows = load_dataset(cfg.dataset)
    if len(rows) < 2:
        raise DataError(f"{cfg.dataset}: {len(rows)} row(s); need at least 2 (one to train on, one held out)")
    train_rows, held = split_rows(rows, cfg.holdout)
    torch.manual_seed(cfg.seed)
    model, tok = _load_base(base, cfg.adapter_type, device)
    present = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                     & set(cfg.target_modules))
    if not present:
        raise AcfError(f"none of target_modules {cfg.target_modules} is a Linear layer of {base}")
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             target_modules=present, task_type="CAUSAL_LM"))
    tr_ex, ho_ex = _examples(tok, train_rows, cfg.seq_len), _examples(tok, held, cfg.seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    eval_curve = [(0, eval_loss(model, ho_ex, pad, device))]
    log(f"training {cfg.adapter_type} on {len(tr_ex)} rows ({len(ho_ex)} held out), base {base}, device {device}; "
        f"held-out loss {eval_curve[0][1]:.4f}")
    curve: list[float] = []
    t0, cap = time.perf_counter(), cfg.max_train_minutes * 60
    stopped = f"train_steps {cfg.train_steps} reached"
    model.train()
    # the methods' AdamW loop (acf.methods._train); the loss projects only answer positions (`_answer_loss`)
    stepper = adamw_steps(trainable, tr_ex, steps=cfg.train_steps, lr=cfg.lr, batch_size=cfg.batch_size, pad_id=pad,
                          device=device, seed=cfg.seed, loss_of_batch=lambda b: (_answer_loss(model, b, causal_ce), {}))
    try:
        for step, loss, _ in stepper:
            curve.append(round(float(loss.item()), 5))
            if step % cfg.eval_steps == 0 or step == cfg.train_steps:
                eval_curve.append((step, eval_loss(model, ho_ex, pad, device)))
                log(f"step {step}/{cfg.train_steps} train loss {curve[-1]:.4f} held-out loss {eval_curve[-1][1]:.4f}")
            if time.perf_counter() - t0 > cap:
                stopped = f"max_train_minutes {cfg.max_train_minutes:g} reached at step {step}"
                if eval_curve[-1][0] != step:
                    eval_curve.append((step, eval_loss(model, ho_ex, pad, device)))
                break
    except NonFiniteLoss as e:
        raise AcfError(f"training diverged: loss {e.value} at step {e.step} (lower lr {cfg.lr})") from None
    wall = time.perf_counter() - t0
    model.eval()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = Path(cfg.output_dir) / stamp
    k = 1
    while final.exists():
        k += 1
        final = Path(cfg.output_dir) / f"{stamp}-{k}"
    metrics = {"adapter_type": cfg.adapter_type, "base_model": str(base), "dataset": str(Path(cfg.dataset).resolve()),
               "dataset_rows": len(rows), "train_rows": len(tr_ex), "heldout_rows": len(ho_ex),
               "steps_done": len(curve), "stopped_because": stopped, "wall_seconds": round(wall, 3),
               "device": device_string(device), "runtime": runtime_string(), "git_commit": git_commit(),
               "trainable_params": sum(p.numel() for p in trainable), "target_modules": present,
               "train_loss_curve": curve, "heldout_loss_curve": [{"step": s, "loss": v} for s, v in eval_curve],
               "heldout_loss_before": eval_curve[0][1], "heldout_loss_after": eval_curve[-1][1],
               "config": cfg.model_dump(), "created_at": now()}
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "metrics.json", metrics)
        write_json(tmp / "split.json", {"holdout": cfg.holdout, "heldout_ids": [r["id"] for r in held],
                                         "train_ids": [r["id"] for r in train_rows]})
        _plot_losses(tmp / "loss_curve.png", curve, eval_curve,
                     f"{cfg.adapter_type} r={cfg.rank} lr={cfg.lr:g} on {Path(cfg.dataset).name}")
    free(model)
    log(f"adapter saved to {final} ({stopped}; held-out loss {eval_curve[0][1]:.4f} -> {eval_curve[-1][1]:.4f})")
    reg_id = None
    if register:
        reg_id = _register_adapter(final, base, metrics, registry_path)
    return TrainResult(adapter_dir=str(final), registry_id=reg_id, steps_done=len(curve), stopped_because=stopped,
                       metrics={k: v for k, v in metrics.items() if not k.endswith("_curve")})


KEEP_ADAPTERS = 3


def _register_adapter(adapter_dir: Path, base: Path, metrics: dict, registry_path) -> str:
    from .registry import open_registry

    dev = metrics["device"]
    ms = {"heldout_loss": Measurement(value=metrics["heldout_loss_after"], unit="nats/token", device=dev,
                                      runtime=metrics["runtime"], n=metrics["heldout_rows"],
                                      method="answer-token cross-entropy on the held-out rows after training"),
          "heldout_loss_base": Measurement(value=metrics["heldout_loss_before"], unit="nats/token", device=dev,
                                           runtime=metrics["runtime"], n=metrics["heldout_rows"],
                                           method="same, before training (adapter at init = base model)")}
    with open_registry(registry_path, create=True) as reg:
        parent = reg.find_path(base)
        if parent is None:
            parent, _ = reg.add_entry(kind="base", path=base, name=Path(metrics["config"]["base_model"]).name)
        e, _ = reg.add_entry(kind="adapter", path=adapter_dir, name=f"adapter-{adapter_dir.name}", parent=parent.id,
                             metrics=ms, source={"train_config": metrics["config"], "steps": metrics["steps_done"],
                                                 "stopped_because": metrics["stopped_because"]})
        _keep_last_adapters(reg)
        return e.id


def _keep_last_adapters(reg) -> list:
    """Keep the last KEEP_ADAPTERS adapters (the active one counts); older ones are removed with their files."""
    keep = KEEP_ADAPTERS - (1 if reg.active("adapter") is not None else 0)
    return reg.prune(max(keep, 0), kinds=("adapter",), delete_artifacts=True)


# ------------------------------------------------------------------------------------------------ eval

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
    from .tasks.gsm8k import extract_answer

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
        texts = [_prompt_text(tok, p) for p in prompts[i:i + batch_size]]
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


def _adapter_dir(ref: str | Path, registry_path=None) -> Path:
    p = Path(ref).expanduser()
    if (p / "adapter_config.json").is_file():
        return p.resolve()
    from .registry import open_registry

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

    from .models import free, resolve_device

    adir = _adapter_dir(adapter, registry_path)
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
            p = _field(r, "prompt")
            ref = r.get("expected") or r.get("reference") or _field(r, "answer")
            if not p or ref is None:
                raise DataError(f"{eval_csv}: row {i} needs prompt and expected (or answer/reference)")
            items.append({"group": f"guard:{(r.get('category') or 'guard').strip()}", "prompt": p,
                          "reference": str(ref), "scorer": (r.get("scorer") or scorer).strip()})
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model, tok = _load_base(Path(meta["base_model"]), meta.get("adapter_type", "lora"), dev, training=False)
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


# ------------------------------------------------------------------------------------------------ promote / rollback

MIN_GAIN = 0.05


def promote_adapter(adapter: str | Path, min_gain: float = MIN_GAIN, registry_path=None, force: bool = False,
                    reason: str = "", export: Optional[str] = None):
    """Make the adapter active if its held-out score beats the base by `min_gain` and no guard group regresses.

    `export` ("gguf:Q4_K_M"): also merge it into its base, export that to GGUF (acf.deploy), record the file in the
    registry entry and point the base's deploy link at it; the export runs before the registry changes, so a
    failed export promotes nothing."""
    from .deploy import parse_export
    from .registry import PromotionRefused, open_registry

    gguf_type = parse_export(export)
    adir = _adapter_dir(adapter, registry_path)
    if not (adir / "eval.json").is_file():
        raise AcfError(f"{adir}: not evaluated yet (run `acf distill eval --adapter {adapter}` first)")
    ev = AdapterEval.model_validate_json((adir / "eval.json").read_text())
    held = ev.group("heldout")
    reasons = []
    if held is None:
        reasons.append("eval.json has no held-out group")
    elif held.delta < min_gain - 1e-12:
        reasons.append(f"held-out score {held.adapted:.3f} vs base {held.base:.3f}: gain {held.delta:+.3f} < "
                       f"{min_gain:+.3f}")
    for g in ev.groups:
        if g.group.startswith("guard:") and g.delta < 0:
            reasons.append(f"{g.group} regresses: {g.adapted:.3f} vs base {g.base:.3f}")
    if reasons and not force:
        raise PromotionRefused(reasons)
    if force and not reason.strip():
        raise AcfError("--force needs --reason (it is recorded in the registry log)")
    ms = {f"score_{g.group.replace(':', '_')}": Measurement(value=g.adapted, unit="score", device=ev.device,
                                                            runtime=ev.runtime, n=g.n,
                                                            method=f"mean {ev.scorer} score of adapted generations",
                                                            extra={"base": g.base, "delta": g.delta})
          for g in ev.groups}
    gguf_file = None
    if gguf_type:
        from .deploy import export_adapter

        meta = json.loads((adir / "metrics.json").read_text())
        gguf_file = export_adapter(adir, Path(meta["base_model"]), gguf_type) / "model.gguf"
    with open_registry(registry_path) as reg:
        e = reg.find_path(adir)
        if e is None:
            raise AcfError(f"{adir} is not in the registry {reg.path} (train registers adapters; use "
                           f"`acf registry add-model {adir} --kind adapter --parent BASE_ID`)")
        e.metrics.update(ms)
        if gguf_file is not None:
            from .deploy import deploy_link, point_deploy_link

            base = reg.get(e.parent) if e.parent else None
            e.source["gguf_export"] = {"type": gguf_type, "path": str(gguf_file), "runtime": "llama.cpp",
                                       "bytes": gguf_file.stat().st_size}
            point_deploy_link(deploy_link(base.name if base else "model"), gguf_file)
        reg.set_active(e, "force" if force else "promote", reason if force else
                       f"held-out {held.adapted:.3f} vs base {held.base:.3f} (gain {held.delta:+.3f} >= {min_gain:g}); "
                       f"no guard regression")
        return e


def rollback_adapter(ref: str, registry_path=None):
    """Restore an earlier adapter as active, then keep only the last 3 adapters."""
    from .registry import open_registry

    with open_registry(registry_path) as reg:
        e = reg.get(ref)
        target, prev = reg.rollback("adapter", to=e.id)
        # the deploy link follows: the restored adapter's GGUF, or none (never the rolled-back one's)
        from .deploy import deploy_link, point_deploy_link

        base = reg.get(target.parent) if target.parent else None
        link = deploy_link(base.name if base else "model")
        exp = (target.source or {}).get("gguf_export")
        if exp and Path(exp["path"]).is_file():
            point_deploy_link(link, Path(exp["path"]))
        elif link.is_symlink():
            link.unlink()
        pruned = _keep_last_adapters(reg)
        return target, prev, pruned
