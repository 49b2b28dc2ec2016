"""Fidelity to the uncompressed model: KL divergence of next-token distributions and top-1 agreement.

Why: a compressed model is good when it behaves like the model it came from. Task accuracy of a small model sits
at its floor, and answer NLL rewards training on the task's own reference solutions (task adaptation), so neither
can rank compression damage. KL(baseline || candidate) per token, teacher-forced on held-out text, is the field's
fidelity measure (llama.cpp `llama-perplexity --kl-divergence`; arXiv 2407.09141 shows it tracks answer flips).

The baseline's distributions are computed once per run (a `Reference`) and reused by every candidate and after
a resume. Keeping the full distribution (vocabulary x positions) is too large, so a reference keeps the top `k`
log-probabilities per position plus the rest as one "tail" bucket; the KL computed on these k+1 buckets is a
lower bound of the exact KL (coarse-graining never increases a KL divergence), and its error is measured in
experiments/bench_fidelity.py and stated in SPEC.md. No library computes this from two transformers models with a
cached reference (lm-eval has no KL metric; llama.cpp's works on GGUF files only), hence the code here.

One teacher-forced forward per batch gives answer NLL, kld and top1 together, so measuring fidelity next to answer
NLL costs one extra log-softmax gather, not a second pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from acf.core.atomic import sha256_file, write_text
from acf.core.errors import AcfError
from acf.core.provenance import Measurement, device_string, runtime_string
from acf.core.stats import per_item
from acf.evaluation.batching import auto_batch_size
from acf.evaluation.generate import batched
from acf.evaluation.logits import scored_logits
from acf.evaluation.sequences import Scored

log = logging.getLogger(__name__)

#: top-k of the baseline distribution kept per position (the rest is one tail bucket)
DEFAULT_TOPK = 128
REFERENCE_VERSION = 1
Z95 = 1.959964


class ReferenceError(AcfError):
    """A reference cache that cannot be used (corrupt, truncated, or made for other sequences)."""


@dataclass
class Reference:
    """The baseline's top-k next-token log-probabilities at every scored position of a set of sequences."""

    ids: list[str]                 # sequence ids, in storage order
    digests: list[str]             # token digest of each sequence (a reference is only used for the same tokens)
    offsets: list[int]             # first row of each sequence in topk_*; rows = target length
    lengths: list[int]
    topk_idx: torch.Tensor         # int32 [rows, k]
    topk_logp: torch.Tensor        # float32 [rows, k]
    k: int
    model: str = ""                # baseline model path, for the record

    def rows(self, seq: Scored) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index().get(seq.id)
        if i is None or self.digests[i] != seq.digest() or self.lengths[i] != len(seq.target):
            raise ReferenceError(f"the baseline reference holds no distribution for sequence {seq.id!r} as tokenized "
                                 f"now (different items, tokenizer or prompt format): rebuild it")
        a, n = self.offsets[i], self.lengths[i]
        return self.topk_idx[a:a + n], self.topk_logp[a:a + n]

    def covers(self, seqs: Sequence[Scored]) -> bool:
        idx = self._index()
        return all(s.id in idx and self.digests[idx[s.id]] == s.digest() for s in seqs)

    def _index(self) -> dict[str, int]:
        if not hasattr(self, "_idx"):
            self._idx = {s: i for i, s in enumerate(self.ids)}
        return self._idx


# ---- the one teacher-forced pass --------------------------------------------------------------------------------

def _forward_rows(model, seqs: Sequence[Scored], batch_size: int, pad: int, progress=None,
                  chunk_elements: Optional[int] = None):
    """Yield (index, seq, offset, float32 logits [m, vocab]) for the scored positions offset..offset+m-1 of each
    sequence, batch by batch (right padding), in chunks of positions whose logits stay within `chunk_elements`
    values (acf.evaluation.logits: bounded memory for 256k vocabularies)."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i].length)
    for chunk in batched(order, batch_size):
        L = max(seqs[i].length for i in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        for row, i in enumerate(chunk):
            s = seqs[i]
            ids[row, :s.length] = torch.tensor(s.prompt + s.target)
            att[row, :s.length] = 1
        # logits at position t predict token t+1: the target tokens are predicted at p-1 .. p+r-2
        spans = [(len(seqs[i].prompt) - 1, len(seqs[i].target)) for i in chunk]
        for row, off, lg in scored_logits(model, ids.to(device), att.to(device), spans, chunk_elements):
            yield chunk[row], seqs[chunk[row]], off, lg
        if progress:
            progress(len(chunk))


def build_reference(model, tokenizer, seqs: Sequence[Scored], *, k: int = DEFAULT_TOPK, batch_size: Optional[int] = 8,
                    model_name: str = "", progress=None, chunk_elements: Optional[int] = None) -> Reference:
    """The baseline's top-k log-probabilities at every scored position of `seqs`."""
    if batch_size is None:
        batch_size = auto_batch_size(model, len(seqs), "score", max((s.length for s in seqs), default=1))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(seqs))}
    for i, s, _, lg in _forward_rows(model, seqs, batch_size, pad, progress, chunk_elements):
        lp = torch.log_softmax(lg, dim=-1)
        v, ix = lp.topk(min(k, lp.shape[-1]), dim=-1)
        parts[i].append((ix.to(torch.int32).cpu(), v.cpu()))   # chunks arrive in position order
    offsets, a = [], 0
    for s in seqs:
        offsets.append(a)
        a += len(s.target)
    kk = min(k, next(p for p in parts.values() if p)[0][0].shape[-1]) if any(parts.values()) else k
    idx = torch.cat([c[0] for i in range(len(seqs)) for c in parts[i]]) if seqs else torch.zeros((0, kk),
                                                                                              dtype=torch.int32)
    lp = torch.cat([c[1] for i in range(len(seqs)) for c in parts[i]]) if seqs else torch.zeros((0, kk))
    return Reference(ids=[s.id for s in seqs], digests=[s.digest() for s in seqs], offsets=offsets,
                     lengths=[len(s.target) for s in seqs], topk_idx=idx, topk_logp=lp, k=kk, model=model_name)


def _kl_rows(logq_full: torch.Tensor, ref_idx: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row on the k+1 buckets (top-k of P, and the rest of the vocabulary as one tail).

    Buckets are summed in float64. A tail mass of P under 1e-6 is left out: it is at the float32 rounding of the
    log-softmax, where 1 - sum(top-k) is noise; its contribution is below 1e-6 x log(p_tail/q_tail) per token."""
    ix = ref_idx.to(logq_full.device, torch.long)
    lp = ref_logp.to(logq_full.device, torch.float64)
    lq = logq_full.gather(-1, ix).to(torch.float64)
    p = lp.exp()
    kl = (p * (lp - lq)).sum(-1)
    if ix.shape[-1] < logq_full.shape[-1]:
        p_tail = (1 - p.sum(-1)).clamp_min(0.0)
        q_tail = (1 - lq.exp().sum(-1)).clamp_min(1e-12)
        tail = torch.where(p_tail > 1e-6, p_tail * (torch.log(p_tail.clamp_min(1e-12)) - torch.log(q_tail)),
                           torch.zeros_like(p_tail))
        kl = kl + tail
    return kl.clamp_min(0.0).float()


def teacher_forced(model, tokenizer, seqs: Sequence[Scored], metrics: Sequence[str], *,
                   reference: Optional[Reference] = None, batch_size: Optional[int] = 8, progress=None,
                   label: str = "", chunk_elements: Optional[int] = None) -> dict[str, Measurement]:
    """answer_nll and/or kld and top1 for `seqs` from one forward per batch.

    kld/top1 need `reference` (the baseline's distributions on the same sequences). Token-weighted means; the 95%
    interval treats items as clusters (the tokens of one item are not independent): delta-method standard error of
    a ratio estimator, sum over items of (s_i - mean * n_i)^2 / (sum n_i)^2 * m/(m-1). Logits are scored in chunks
    of positions of at most `chunk_elements` float32 values (default acf.evaluation.logits.CHUNK_ELEMENTS).
    """
    want = set(metrics)
    if want & {"kld", "top1"} and reference is None:
        raise AcfError("kld/top1 need the baseline's reference distributions (none given)")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    if batch_size is None:
        batch_size = auto_batch_size(model, len(seqs), "score", max((s.length for s in seqs), default=1))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(seqs)
    nll_sum, kl_sum, agree_sum, tok = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
    kl_all: list[torch.Tensor] = []
    for i, s, off, lg in _forward_rows(model, seqs, batch_size, pad, progress, chunk_elements):
        logq = torch.log_softmax(lg, dim=-1)
        m = logq.shape[0]
        tok[i] = len(s.target)
        if "answer_nll" in want:
            tgt = torch.tensor(s.target[off:off + m], device=logq.device)
            nll_sum[i] += float(-logq.gather(-1, tgt[:, None]).sum())
        if want & {"kld", "top1"}:
            ridx, rlp = reference.rows(s)
            ridx, rlp = ridx[off:off + m], rlp[off:off + m]
            if "kld" in want:
                kl = _kl_rows(logq, ridx, rlp)
                kl_sum[i] += float(kl.sum())
                kl_all.append(kl.cpu())
            if "top1" in want:
                agree_sum[i] += float((logq.argmax(-1).cpu() == ridx[:, 0].long()).sum())
    secs = round(time.perf_counter() - t0, 3)
    total = sum(tok)
    ids = [s.id for s in seqs]   # per-item sums are kept so two models on the same items compare paired
    dev, rt = device_string(str(device)), runtime_string()
    where = f"{label} " if label else ""
    out: dict[str, Measurement] = {}
    if "answer_nll" in want:
        v = sum(nll_sum) / max(total, 1)
        out["answer_nll"] = Measurement(
            value=v if math.isfinite(v) else float("inf"), unit="nats/token", device=dev, runtime=rt, n=n,
            seconds=secs, ci95=_ratio_ci(nll_sum, tok),
            method=f"teacher-forced mean NLL per reference token (token-weighted), batch {batch_size}",
            extra={"tokens": total, "item_mean": sum(a / max(b, 1) for a, b in zip(nll_sum, tok)) / max(n, 1)})
    if "kld" in want:
        allk = torch.cat(kl_all) if kl_all else torch.zeros(0)
        v = sum(kl_sum) / max(total, 1)
        out["kld"] = Measurement(
            value=v, unit="nats/token", device=dev, runtime=rt, n=n, seconds=secs, ci95=_ratio_ci(kl_sum, tok, lo=0.0),
            method=(f"mean per-token KL(baseline || model) of next-token distributions, teacher-forced on {where}"
                    f"held-out text, token-weighted; baseline as top-{reference.k} + tail bucket (a lower bound); "
                    f"batch {batch_size}"),
            extra={"tokens": total, "p99": float(torch.quantile(allk, 0.99)) if allk.numel() else None,
                   "median": float(allk.median()) if allk.numel() else None, "topk": reference.k,
                   "per_item": per_item(ids, kl_sum, tok)})
    if "top1" in want:
        v = sum(agree_sum) / max(total, 1)
        out["top1"] = Measurement(
            value=v, unit="fraction", device=dev, runtime=rt, n=n, seconds=secs,
            ci95=_ratio_ci(agree_sum, tok, lo=0.0, hi=1.0),
            method=f"share of {where}positions where the model's most likely next token is the baseline's, "
                   f"teacher-forced, token-weighted",
            extra={"tokens": total, "per_item": per_item(ids, agree_sum, tok)})
    return out


def _ratio_ci(sums: Sequence[float], counts: Sequence[int], lo: Optional[float] = None,
              hi: Optional[float] = None) -> Optional[tuple[float, float]]:
    m = len(sums)
    N = sum(counts)
    if m < 2 or N == 0:
        return None
    mu = sum(sums) / N
    var = sum((s - mu * c) ** 2 for s, c in zip(sums, counts)) / (N * N) * m / (m - 1)
    half = Z95 * math.sqrt(var)
    a, b = mu - half, mu + half
    if lo is not None:
        a = max(lo, a)
    if hi is not None:
        b = min(hi, b)
    return (a, b)


# ---- the cache in the run directory ----------------------------------------------------------------------------


def save_reference(ref: Reference, path: Path) -> None:
    """`path` (.safetensors) and `path`.json (manifest with the tensors' sha256), each written atomically.

    The manifest is written last: a tensor file without a manifest that names its checksum is never read."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"topk_idx": ref.topk_idx.contiguous(), "topk_logp": ref.topk_logp.contiguous()}, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {"version": REFERENCE_VERSION, "k": ref.k, "model": ref.model, "sha256": digest, "ids": ref.ids,
                "digests": ref.digests, "offsets": ref.offsets, "lengths": ref.lengths}
    write_text(_manifest(path), json.dumps(manifest) + "\n")


def _manifest(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_reference(path: Path) -> Reference:
    """Read a saved reference; anything corrupt, truncated or inconsistent raises ReferenceError naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    man = _manifest(path)
    try:
        meta = json.loads(man.read_text(encoding="utf-8"))
        if meta.get("version") != REFERENCE_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, expected {REFERENCE_VERSION}")
        ids, digests, offsets, lengths = meta["ids"], meta["digests"], meta["offsets"], meta["lengths"]
        if not (len(ids) == len(digests) == len(offsets) == len(lengths)):
            raise ValueError("manifest lists of different lengths")
    except FileNotFoundError:
        raise ReferenceError(f"{man}: the reference manifest is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReferenceError(f"{man}: corrupt baseline reference manifest ({e})") from None
    try:
        if sha256_file(path) != meta["sha256"]:
            raise ReferenceError(f"{path}: the baseline reference does not match its checksum (truncated or "
                                 f"modified)")
        t = load_file(str(path))
    except ReferenceError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ReferenceError(f"{path}: unreadable baseline reference ({type(e).__name__}: {e})") from None
    rows = sum(lengths)
    idx, lp = t.get("topk_idx"), t.get("topk_logp")
    if idx is None or lp is None or idx.shape != lp.shape or idx.shape[0] != rows or idx.shape[1] != meta["k"]:
        raise ReferenceError(f"{path}: baseline reference tensors do not match the manifest ({rows} rows x "
                             f"{meta['k']} expected)")
    if not torch.isfinite(lp).all() or (lp > 1e-4).any():
        raise ReferenceError(f"{path}: baseline reference holds values that are not log-probabilities")
    return Reference(ids=ids, digests=digests, offsets=offsets, lengths=lengths, topk_idx=idx, topk_logp=lp,
                     k=int(meta["k"]), model=meta.get("model", ""))


def cached_reference(path: Path, seqs: Sequence[Scored], build: Callable[[], Reference],
                     say: Callable[[str], None] = log.warning) -> Reference:
    """The reference at `path` if it covers `seqs`; otherwise (missing, corrupt, made for other sequences) rebuilt
    with `build()` and saved. A corrupt cache is never read as zeros: it is named, then recomputed."""
    path = Path(path)
    if _manifest(path).exists() or path.exists():
        try:
            ref = load_reference(path)
            if ref.covers(seqs):
                return ref
            say(f"{path}: the baseline reference was made for other sequences; recomputing it")
        except ReferenceError as e:
            say(f"{e}; recomputing it")
    ref = build()
    save_reference(ref, path)
    return ref
