"""train: a PEFT LoRA/QLoRA adapter from a strict JSON config, through the methods' AdamW loop and 4-bit loader;
saved unmerged with metrics and a loss curve, and registered."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from acf.coordinator.state import now
from acf.core.atomic import atomic_dir, read_json_strict, write_json
from acf.core.errors import AcfError, DataError
from acf.core.provenance import Measurement, device_string, git_commit, runtime_string
from acf.lifecycle.dataset import load_dataset, split_rows
from acf.lifecycle.registry import open_registry
from acf.models.loading import free, load_model, load_tokenizer, resolve_device, resolve_model


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


def prompt_text(tok, prompt: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return f"Question: {prompt}\nAnswer:"


def _examples(tok, rows: list[dict], seq_len: int):
    from acf.methods.calibration import TrainExample

    out = []
    eos = tok.eos_token or ""
    for r in rows:
        p = tok(prompt_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        a = tok(str(r["answer"]) + eos, add_special_tokens=False)["input_ids"]
        ids, labels = (p + a)[:seq_len], ([-100] * len(p) + a)[:seq_len]
        if any(x != -100 for x in labels[1:]):
            out.append(TrainExample(ids, labels))
    return out


def load_base(base: Path, adapter_type: str, device: str, training: bool = True):
    """Base model for LoRA (full precision) or QLoRA (bitsandbytes NF4 4-bit, frozen).

    Evaluation loads a QLoRA adapter's base in 4-bit too: the adapter was fitted to the quantized weights.
    """
    if adapter_type == "lora":
        return load_model(base, device)
    try:
        import bitsandbytes  # noqa: F401

        from acf.methods.lora import load_kbit   # the qlora method's loader: one 4-bit loading path

        model = load_kbit(base, device, quantize_nf4=True, training=training)
    except Exception as e:  # noqa: BLE001 - any library failure means the same to the user
        raise AcfError(f"qlora cannot run on {device}: bitsandbytes 4-bit loading failed "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use adapter_type lora") from None
    model.eval()
    return model, load_tokenizer(base)


def _plot_losses(path: Path, train: list[float], evals: list[tuple[int, float]], title: str) -> None:
    from matplotlib.figure import Figure

    from acf.reports.frontier_frame import save_figure

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

    from acf.methods.training_loop import NonFiniteLoss, adamw_steps, causal_ce, eval_loss

    cfg = config if isinstance(config, TrainConfig) else load_train_config(config)
    device = resolve_device(cfg.device)
    base = resolve_model(cfg.base_model)
    rows = load_dataset(cfg.dataset)
    if len(rows) < 2:
        raise DataError(f"{cfg.dataset}: {len(rows)} row(s); need at least 2 (one to train on, one held out)")
    train_rows, held = split_rows(rows, cfg.holdout)
    torch.manual_seed(cfg.seed)
    model, tok = load_base(base, cfg.adapter_type, device)
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
    # the methods' AdamW loop (acf.methods.training_loop); the loss projects only answer positions (`_answer_loss`)
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
        keep_last_adapters(reg)
        return e.id


def keep_last_adapters(reg) -> list:
    """Keep the last KEEP_ADAPTERS adapters (the active one counts); older ones are removed with their files."""
    keep = KEEP_ADAPTERS - (1 if reg.active("adapter") is not None else 0)
    return reg.prune(max(keep, 0), kinds=("adapter",), delete_artifacts=True)
