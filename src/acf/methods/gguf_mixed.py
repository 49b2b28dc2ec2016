"""Per-tensor GGUF types under a size budget: the `gguf` method's `avg_bits`, the token embedding included.

The same idea as the compressed-tensors allocation (acf.methods.mixed: a Fisher estimate of the KL each choice adds,
a multiple-choice knapsack under a byte budget), with two differences that make it worth a path of its own:
- the error of each choice is llama.cpp's own: the F16 export is quantized once per candidate type by llama.cpp's
  quantizer (with the step's importance matrix) and read back with gguf-py's dequantizers, so k-quants' nested
  scales, IQ4's non-uniform grid and the imatrix weighting are all in the estimate, not an RTN stand-in;
- the token embedding is allocated like any matmul weight. In a tied model it is also the output projection, which
  is why every recipe keeps it wide and why it is about half of a 4-bit file at 135M; llama.cpp loads any type for
  it, while transformers 5.17 cannot load a compressed-tensors-quantized embedding at all (tied: "Linear has no
  attribute weight"; untied: "'Embedding' object has no attribute 'weight'", found on a tiny model), so only this
  path can trade its bits.
The allocation is written as per-tensor overrides (`^name$` -> type) that llama.cpp's quantizer applies: replayable
as the `gguf` step's `overrides`, and read back from the file to check every tensor got its type.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from acf.core.errors import MethodFailed
from acf.methods import gguf_quantize as GQ
from acf.methods.mixed import BudgetAllocation, fisher_diagonal, solve
from acf.methods.sensitivity_cache import SensitivityCache, cached_sensitivity, weights_digest
from acf.models.loading import cache_dir

#: estimator version: part of the cache key
GGUF_SENSITIVITY_VERSION = "gguf-fisher-llamacpp-v1"
#: candidate tensor types when a step names none (blocks of 256 need row widths that are multiples of 256)
DEFAULT_TYPES = ("Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "F16")
#: budgets (bits per allocated weight, embedding included) the search offers: llama.cpp's Q4_K_M is about 4.9 on
#: models whose widths take k-quants, more where they fall back (6.3 on SmolLM2's 576-wide tensors)
DEFAULT_BUDGETS = (4.5, 5.0, 5.5, 6.0, 6.5)


def type_size(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml tensor type, from gguf-py's table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def tensor_bytes(type_name: str, rows: int, cols: int) -> Optional[int]:
    """Bytes of a rows x cols weight stored as `type_name`, None where the block does not divide the row."""
    block, size = type_size(type_name)
    if cols % block:
        return None
    return rows * (cols // block) * size


class TensorShape(BaseModel):
    name: str           # GGUF tensor name
    rows: int
    cols: int           # row width (the dimension blocks run along)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def min_bits(shapes: list[TensorShape], types: list[str]) -> float:
    """The smallest budget the palette reaches on these tensors (each at its cheapest type that fits)."""
    total = 0
    for s in shapes:
        fit = [b for b in (tensor_bytes(t, s.rows, s.cols) for t in types) if b is not None]
        if not fit:
            return float("inf")
        total += min(fit)
    return 8 * total / max(1, sum(s.numel for s in shapes))


def shapes_from_spec(spec) -> list[TensorShape]:
    """The matrices a GGUF export of a model holds, from its spec alone (validation and the search space use it
    before any export exists): every Linear (lm_head, as `output`, only when untied) and the token embedding."""
    shapes = [TensorShape(name=("output" if l.name.endswith("lm_head") else l.name), rows=l.out_features,
                          cols=l.in_features) for l in spec.linears
              if not (l.name.endswith("lm_head") and spec.tied_embeddings)]
    if spec.vocab_size and spec.hidden_size:
        shapes.append(TensorShape(name="token_embd", rows=spec.vocab_size, cols=spec.hidden_size))
    return shapes


def q4km_bits_estimate(shapes: list[TensorShape]) -> float:
    """A lower estimate of llama.cpp's Q4_K_M size in the same bits: Q4_K where 256-blocks fit the row, else its
    fallback Q5_0, and Q6_K (fallback Q8_0) for the token embedding / output. llama.cpp also raises some attn_v and
    ffn_down tensors to Q6_K, left out here, so a budget at or below this estimate is no larger than Q4_K_M. Used to
    seed the search with acf's answer to Q4_K_M at its size."""
    total = 0
    for s in shapes:
        head = s.name.startswith(("token_embd", "output"))
        for t in (("Q6_K", "Q8_0") if head else ("Q4_K", "Q5_0")):
            b = tensor_bytes(t, s.rows, s.cols)
            if b is not None:
                total += b
                break
        else:
            total += s.numel * 2
    return 8 * total / max(1, sum(s.numel for s in shapes))


class GGUFAllocation(BudgetAllocation):
    """The per-tensor types chosen for a budget (embedding included), as stored in the step record."""

    tensor_types: dict[str, str]

    def overrides(self) -> dict[str, str]:
        """llama.cpp tensor-type overrides (regex, searched in the tensor name) giving exactly these types."""
        return {f"^{re.escape(n)}$": t for n, t in self.tensor_types.items()}


def allocate_types(shapes: list[TensorShape], scores: dict[str, dict[str, float]], types: list[str],
                   budget_bits: float) -> GGUFAllocation:
    """One type per tensor minimising summed estimated KL under `budget_bits` per allocated weight. Pure."""
    lo = min_bits(shapes, types)
    if budget_bits < lo - 1e-9:
        raise ValueError(f"avg_bits {budget_bits:g} is below the smallest size the types {', '.join(types)} reach on "
                         f"this model ({lo:.3f} bits per weight, embedding included)")
    costs, sc = [], []
    for s in shapes:
        row_c, row_s = [], []
        for t in types:
            b = tensor_bytes(t, s.rows, s.cols)
            ok = b is not None and (t == "F16" or t in scores.get(s.name, {}))
            row_c.append(b if ok else None)
            row_s.append(0.0 if (not ok or t == "F16") else float(scores[s.name][t]))
        costs.append(row_c)
        sc.append(row_s)
    total_w = sum(s.numel for s in shapes)
    try:
        picked, facts = solve([s.name for s in shapes], types, costs, sc, budget_bits, total_w)
    except ValueError:
        raise ValueError(f"no allocation of the types {', '.join(types)} meets {budget_bits:g} bits per weight") from None
    return GGUFAllocation(tensor_types=picked, **facts)


# --- what needs the model and llama.cpp -----------------------------------------------------------------------------

def _tensor_infos(path: Path) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """(name, ne, ggml type id, data offset) of every tensor, and where tensor data starts.

    Why by hand: gguf-py's GGUFReader builds a numpy view per metadata element, about 6 s per file for a
    49k-token vocabulary, and a sensitivity pass reads a dozen files; this walks the documented layout (GGUF v2/v3:
    header, key/values, tensor infos, data aligned to `general.alignment`) and skips values by their lengths."""
    import struct

    b = Path(path).read_bytes() if Path(path).stat().st_size < (1 << 20) else None
    with open(path, "rb") as fh:
        import mmap

        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if b is None else b
        try:
            if mm[:4] != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file")
            version, n_t, n_kv = struct.unpack_from("<IQQ", mm, 4)
            if version < 2:
                raise ValueError(f"{path}: GGUF version {version} is not supported")
            off = 24
            fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
            alignment = 32

            def skip(vt: int, o: int) -> int:
                if vt in fixed:
                    return o + fixed[vt]
                if vt == 8:                                    # string: u64 length + bytes
                    return o + 8 + struct.unpack_from("<Q", mm, o)[0]
                if vt == 9:                                    # array: u32 type, u64 count, items
                    at, n = struct.unpack_from("<IQ", mm, o)
                    o += 12
                    if at in fixed:
                        return o + n * fixed[at]
                    for _ in range(n):
                        o = skip(at, o)
                    return o
                raise ValueError(f"{path}: unknown GGUF value type {vt}")

            for _ in range(n_kv):
                klen = struct.unpack_from("<Q", mm, off)[0]
                key = bytes(mm[off + 8: off + 8 + klen]).decode()
                off += 8 + klen
                vt = struct.unpack_from("<I", mm, off)[0]
                off += 4
                if key == "general.alignment" and vt == 4:
                    alignment = struct.unpack_from("<I", mm, off)[0]
                off = skip(vt, off)
            infos = []
            for _ in range(n_t):
                nlen = struct.unpack_from("<Q", mm, off)[0]
                name = bytes(mm[off + 8: off + 8 + nlen]).decode()
                off += 8 + nlen
                nd = struct.unpack_from("<I", mm, off)[0]
                ne = struct.unpack_from(f"<{nd}Q", mm, off + 4)
                off += 4 + 8 * nd
                tt, toff = struct.unpack_from("<IQ", mm, off)
                off += 12
                infos.append((name, tuple(int(x) for x in ne), int(tt), int(toff)))
            start = (off + alignment - 1) // alignment * alignment
        finally:
            if b is None:
                mm.close()
    return infos, start


def allocatable(f16_path: Path) -> list[TensorShape]:
    """The 2-D weights llama.cpp's quantizer quantizes (every `*.weight` matrix but norms), from the F16 export."""
    out = []
    for name, ne, _, _ in _tensor_infos(f16_path)[0]:
        if len(ne) == 2 and name.endswith(".weight") and "norm" not in name:
            out.append(TensorShape(name=name, rows=ne[1], cols=ne[0]))    # ne lists (row width, rows)
    return out


class GGUFTensors:
    """A GGUF file's 2-D tensors, read one at a time as float32 (dequantized with gguf-py) from a memory map: the
    sensitivity pass holds one tensor of a file at once, not a float32 copy of the whole model (32 GB at 8B)."""

    def __init__(self, path: Path, names: Optional[set[str]] = None):
        import numpy as np

        infos, self._start = _tensor_infos(path)
        self._infos = {n: (ne, tt, off) for n, ne, tt, off in infos
                       if len(ne) == 2 and (names is None or n in names)}
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self._infos)

    def type_name(self, name: str) -> str:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(self._infos[name][1]).name

    def get(self, name: str):
        import numpy as np
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        ne, tt, off = self._infos[name]
        qt = GGMLQuantizationType(tt)
        rows, cols = ne[1], ne[0]
        nbytes = tensor_bytes(qt.name, rows, cols) if qt.name != "F32" else rows * cols * 4
        raw = np.asarray(self._mm[self._start + off: self._start + off + nbytes]).reshape(rows, -1)
        if qt.name in ("F32", "F16", "BF16"):
            raw = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[qt.name])
        return dequantize(raw, qt).astype(np.float32, copy=False).reshape(rows, cols)

    def close(self) -> None:
        del self._mm


def _permute(w, n_head: int):
    """llama.cpp's converter reorders Llama q/k rows for its rotary layout (convert_hf_to_gguf `LlamaModel.permute`);
    the Fisher of those weights is reordered the same way so each entry meets its own weight's error."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_params_by_gguf_name(model, f16: GGUFTensors) -> dict[str, tuple[Any, Optional[int]]]:
    """GGUF tensor name -> (HF parameter, heads of the row permutation or None), found by matching values: the
    converter's name map and q/k reordering are its own, so each allocatable GGUF tensor is matched to the HF weight
    whose values it holds (as stored, or row-permuted for n_head / n_kv_head). A tensor matched by none is an error:
    its sensitivity would be unknown."""
    import numpy as np

    cfg = model.config
    heads = [h for h in {getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)} if h]
    by_shape: dict[tuple[int, int], list[tuple[str, Any]]] = {}
    seen = set()
    for n, p in model.named_parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            by_shape.setdefault(tuple(p.shape), []).append((n, p))
    out = {}
    for g in f16.names():
        w16 = f16.get(g)
        found = None
        probe = w16[: min(64, w16.shape[0])]
        for n, p in by_shape.get(tuple(w16.shape), []):
            w = p.detach().float().cpu()
            for h in [None] + heads:
                if h is not None and (w.shape[0] % (2 * h)):
                    continue
                wp = w if h is None else _permute(w, h)
                if np.allclose(wp[: probe.shape[0]].numpy(), probe, atol=1e-2, rtol=1e-2) and \
                        np.allclose(wp.numpy(), w16, atol=1e-2, rtol=1e-2):
                    found = (p, h)
                    break
            if found:
                break
        if found is None:
            raise MethodFailed("gguf", "library", f"GGUF tensor {g} matches no weight of the HF model (as stored or "
                                                  f"with llama.cpp's q/k row order): cannot estimate its sensitivity")
        out[g] = found
    return out


def gguf_sensitivity(model, ids, f16_path: Path, types: list[str], imatrix: Optional[dict], work: Path, *,
                     seed: int = 0, progress=None) -> dict[str, dict[str, float]]:
    """Estimated KL increase per (GGUF tensor, type): 1/2 sum F dW^2 / tokens with F the diagonal Fisher of the HF
    model (`fisher_diagonal`) and dW = llama.cpp's quantization of that tensor to the type minus its F16 value."""

    f16 = GGUFTensors(f16_path, {s.name for s in allocatable(f16_path)})
    match = hf_params_by_gguf_name(model, f16)
    uniq = {id(p): p for p, _ in match.values()}
    names = {id(p): f"p{i}" for i, p in enumerate(uniq.values())}
    fisher, tokens = fisher_diagonal(model, ids, {names[k]: p for k, p in uniq.items()}, seed=seed, progress=progress)
    F = {}
    for g, (p, h) in match.items():
        f = fisher[names[id(p)]].cpu()
        F[g] = (f if h is None else _permute(f, h)).numpy()
    del fisher
    out: dict[str, dict[str, float]] = {g: {} for g in f16.names()}
    for t in types:
        if t == "F16":
            continue
        q = work / f"probe-{t}.gguf"
        GQ.quantize(f16_path, q, "Q8_0", imatrix, {"weight": t}, nthread=0)
        probe = GGUFTensors(q, set(out))
        for g in probe.names():
            if probe.type_name(g) == t:
                out[g][t] = float(0.5 * (F[g] * (probe.get(g) - f16.get(g)) ** 2).sum() / max(1, tokens))
        probe.close()
        q.unlink()
    f16.close()
    return out


def gguf_sensitivity_key(weights: str, task: str, n: int, seq_len: int, seed: int, types: list[str],
                         imatrix: Optional[tuple[int, ...]], general_samples: int = 0) -> str:
    """The cache key of a GGUF sensitivity pass. `imatrix` is (samples, seq_len[, general samples]) of the
    importance matrix the probes were quantized with; `general_samples` (general-text windows of the pass's `n`)
    joins the key only when non-zero, so task-only keys, and the caches written under them, stay valid."""
    parts: list = [GGUF_SENSITIVITY_VERSION, weights, task, n, seq_len, seed, sorted(types), imatrix]
    if general_samples:
        parts.append({"general_samples": general_samples})
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def imatrix_key(params: dict, general: float) -> tuple[int, ...]:
    """What identifies the step's importance matrix in the sensitivity key: (samples, seq_len), plus its number of
    general-text windows when the calibration mix gave it any (task-only keys unchanged)."""
    from acf.methods.calibration import general_count

    n, L = int(params["calib_samples"]), int(params["seq_len"])
    g = general_count(n, general, "gguf")
    return (n, L, g) if g else (n, L)


def allocation_for(model, tok, params: dict, in_dir: Path, f16_path: Path, imatrix: Optional[dict], ctx,
                   work: Path) -> tuple[GGUFAllocation, dict]:
    """The step's per-tensor types for `avg_bits`, from the cached (or computed) sensitivity of `in_dir`."""
    from acf.methods.model_io import report
    from acf.methods.calibration import calibration_facts, calibration_ids, calibration_name, general_count

    shapes = allocatable(f16_path)
    types = list(params.get("types") or DEFAULT_TYPES)
    n, L = int(params.get("sensitivity_samples") or 16), int(params.get("sensitivity_seq_len") or 512)
    task = calibration_name(ctx.task)   # with a --calib-data file, its digest too
    key = gguf_sensitivity_key(weights_digest(in_dir), task, n, L, ctx.seed, types,
                               imatrix_key(params, ctx.calib_mix) if imatrix else None,
                               general_count(n, ctx.calib_mix, "gguf"))

    def compute():
        ids = calibration_ids(tok, ctx.task, n, L, ctx.seed, "gguf", ctx.calib_mix)
        return gguf_sensitivity(model, ids, f16_path, types, imatrix, work, seed=ctx.seed,
                                progress=lambda d, t: report(ctx, "sensitivity", d, t))

    t0 = time.perf_counter()
    cache, hit = cached_sensitivity(cache_dir() / "sensitivity", key, compute, task=task, n=n, seq_len=L)
    try:
        alloc = allocate_types(shapes, cache.scores, types, float(params["avg_bits"]))
    except ValueError as e:
        raise MethodFailed("gguf", "config", str(e)) from None
    f16_alloc = sum(s.numel for s in shapes) * 2
    facts: dict[str, Any] = {
        "source": f"allocated for avg_bits={params['avg_bits']} (bits per allocated weight, embedding included)",
        "sensitivity": {"estimator": GGUF_SENSITIVITY_VERSION, "samples": n, "seq_len": L, "cache_hit": hit,
                        "seconds": cache.seconds, "key": key, "imatrix": bool(imatrix),
                        **calibration_facts(ctx.task, n, ctx.calib_mix, "gguf", " (evaluation's prompt format)")},
        "types": types, "allocation": alloc.model_dump(),
        "predicted_file_bytes": f16_path.stat().st_size - f16_alloc + alloc.predicted_bytes,
        "allocation_seconds": round(time.perf_counter() - t0, 3)}
    return alloc, facts


def check_written(facts: dict, alloc: GGUFAllocation, dst: Path) -> None:
    """Put the measured file size beside the prediction, and the tensors llama.cpp did not store as allocated."""
    from gguf import GGUFReader

    got = {t.name: t.tensor_type.name for t in GGUFReader(str(dst)).tensors}
    wrong = {n: f"{t} -> {got.get(n)}" for n, t in alloc.tensor_types.items() if got.get(n) != t}
    size = dst.stat().st_size
    facts.update(measured_file_bytes=size, size_prediction_error=round((facts["predicted_file_bytes"] - size) / size, 5),
                 types_not_as_allocated=wrong)
    if wrong:
        raise MethodFailed("gguf", "library", f"llama.cpp stored {len(wrong)} tensor(s) in another type than "
                                              f"allocated, e.g. {dict(list(wrong.items())[:2])}")


__all__ = ["DEFAULT_TYPES", "DEFAULT_BUDGETS", "TensorShape", "GGUFAllocation", "allocate_types", "min_bits",
           "tensor_bytes", "allocatable", "gguf_sensitivity", "allocation_for", "check_written", "SensitivityCache"]
