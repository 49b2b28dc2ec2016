"""Predict a proposal's damage and size before spending an episode on it.

A small surrogate fitted on the run's own measurements (the fixed recipes and every measured episode): log kld is a
ridge regression on features read off the strategy (nominal bits per quantized weight from each method's registry
declaration, the quantizer, allocation, act-order, kd_tune / recovery steps, sparsity, dropped blocks), and size is
a formula from the model's shapes, corrected by a line fitted to the measured sizes. Hand-written: no library fits
a model on a dozen strategies of this shape, and the numbers are few enough that numpy's least squares is the whole
method. Predictions are estimates and say so (`Prediction.how`); every candidate keeps the prediction made before it
ran, so the run reports how good they were (Spearman's rho of predicted vs measured kld).

Who uses it: acf.coordinator.screening (screen a proposal predicted to be clearly dominated) and acf.search.aim
(the budget whose predicted size is a target size).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel

from acf.methods.registry import get as get_method
from acf.methods.strategy import Strategy, kind_of

#: floor of kld in the log (a candidate at 0 nats/token would dominate the fit)
KLD_FLOOR = 1e-4
#: ridge strength: coefficients are pulled toward PRIOR (features are O(1)), the intercept is free
RIDGE = 1.0
#: prior coefficients of log kld (what a run with few points leans on), read off acf's measured tables
#: (experiments/results/recipes-*.md, mixed-*.md, methods-*.md on SmolLM2-135M): about -1.7 per bit from W3 to W4
#: and -1.0 per bit above 4.5; kd_tune about 0.6x; an allocation 0.85x; act-order 0.8x; AutoRound 0.6x GPTQ;
#: 50% unstructured sparsity about 20x (bits held); one dropped block of 30 about 4x
PRIOR = {"slope": -1.7, "hinge": 0.7, "tune": -0.5, "alloc": -0.15, "act_order": -0.2, "q:autoround": -0.5,
         "sparsity": 6.0, "drop": 40.0}
#: fewer measured points than this: no kld prediction (nothing to screen on)
MIN_POINTS = 6


class Prediction(BaseModel):
    """A proposal's predicted kld and size, made before it ran (an estimate, never a measurement)."""

    kld: Optional[float] = None
    size: Optional[float] = None
    #: residual standard deviation of log kld over the fitted points (in-sample, inflated for the fitted terms)
    log_sd: Optional[float] = None
    n: int = 0
    how: str = ""


def features(strategy: Strategy, spec: Any) -> dict[str, float]:
    """What the surrogate reads off a strategy (pure). `bits` is the nominal bits per quantized Linear weight (16
    without a quantizer), `kept` the share of decoder blocks left."""
    f: dict[str, float] = {"bits": 16.0, "kept": 1.0}
    layers = max(1, int(getattr(spec, "num_layers", 1) or 1))
    for st in strategy.steps:
        kind, p = kind_of(st.method), st.params
        info = get_method(st.method)
        if kind == "quantize":
            bits = info.stored_bits(p, spec) if info is not None and info.stored_bits is not None else None
            f["bits"] = float(bits) if bits is not None else math.nan
            f[f"q:{st.method}"] = 1.0
            if p.get("avg_bits") is not None or p.get("layer_formats"):
                f["alloc"] = 1.0
            if p.get("act_order"):
                f["act_order"] = 1.0
        elif kind == "prune":
            if st.method == "drop_layers":
                n = int(p.get("count") or round(float(p.get("ratio") or 0) * layers))
                f["kept"] = (layers - n) / layers
                f["drop"] = n / layers
            else:
                f[f"p:{st.method}"] = 1.0
                f["sparsity"] = 0.5 if p.get("pattern") in ("2:4", "4:8") else float(p.get("sparsity") or 0.5)
        elif kind == "tune":
            f["tune"] = math.log1p(int(p.get("steps") or 100)) / math.log1p(100)
        elif kind in ("lora", "distill"):
            f[f"r:{st.method}"] = math.log1p(int(p.get("steps") or 100)) / math.log1p(100)
    return f


def _row(f: dict[str, float], cols: Sequence[str]) -> np.ndarray:
    b = min(max(f["bits"], 2.0), 8.0)
    out = [1.0, b - 4.0, max(0.0, b - 4.5)]
    out += [f.get(c, 0.0) for c in cols]
    return np.array(out, dtype=float)


class Surrogate:
    """Fitted on (features, measured kld, measured size) points; `predict` a strategy's kld and size."""

    def __init__(self, spec: Any, base_size: Optional[float], points: Sequence[tuple[dict[str, float], float, float]]):
        self.spec = spec
        self.base_size = base_size
        pts = [(f, k, s) for f, k, s in points if not math.isnan(f["bits"]) and k is not None and k >= 0]
        self.n = len(pts)
        self.cols = sorted({c for f, _, _ in pts for c in f if c not in ("bits", "kept")})
        self.coef: Optional[np.ndarray] = None
        self.log_sd: Optional[float] = None
        if self.n >= MIN_POINTS:
            X = np.stack([_row(f, self.cols) for f, _, _ in pts])
            y = np.log(np.maximum([k for _, k, _ in pts], KLD_FLOOR))
            reg = RIDGE * np.eye(X.shape[1])
            reg[0, 0] = 0.0
            w0 = np.array([0.0, PRIOR["slope"], PRIOR["hinge"]] + [PRIOR.get(c, 0.0) for c in self.cols])
            self.coef = np.linalg.solve(X.T @ X + reg, X.T @ y + reg @ w0)
            resid = y - X @ self.coef
            dof = max(1, self.n - min(X.shape[1], self.n - 1))
            self.log_sd = float(math.sqrt(float(resid @ resid) / dof))
        # size: formula, then measured = a * formula + c where the points spread enough to fit a line
        self.size_fit = (1.0, 0.0)
        xs = [self.formula_size(f) for f, _, s in pts if s]
        ys = [s for f, _, s in pts if s]
        if len(xs) >= 2 and max(xs) > min(xs) * 1.05:
            a, c = np.polyfit(np.array(xs), np.array(ys), 1)
            if a > 0:
                self.size_fit = (float(a), float(c))

    @classmethod
    def from_frontier(cls, ff: Any, spec: Any) -> "Surrogate":
        """Fitted on the run's measured recipes and episodes (ok, with kld and size)."""
        pts = []
        for c in list(ff.recipes) + list(ff.candidates):
            m = c.metrics
            if c.status != "ok" or "kld" not in m or "size" not in m or m["kld"].value is None:
                continue
            pts.append((features(c.strategy, spec), float(m["kld"].value), float(m["size"].value or 0)))
        base = ff.baseline.metrics["size"].value if ff.baseline is not None and "size" in ff.baseline.metrics else None
        return cls(spec, base, pts)

    # ---- size ------------------------------------------------------------------------------------------------
    def _linear_numel(self) -> int:
        return sum(l.out_features * l.in_features for l in self.spec.linears if not l.name.endswith("lm_head"))

    def formula_size(self, f: dict[str, float]) -> float:
        """Bytes from the shapes: the uncompressed file with its quantizable Linear weights at `bits` (a GGUF file
        holds every matrix, embedding included, at its budget), only the kept blocks' Linear weights counted."""
        bits = f["bits"]
        total = self.base_size or self.spec.params * self.spec.bytes_per_param
        if f.get("q:gguf"):
            return self.spec.params * f["kept"] * bits / 8
        lin = self._linear_numel()
        return total - lin * self.spec.bytes_per_param + f["kept"] * lin * bits / 8

    def size(self, f: dict[str, float]) -> Optional[float]:
        if math.isnan(f["bits"]):
            return None
        a, c = self.size_fit
        return a * self.formula_size(f) + c

    def bits_for_size(self, size: float, gguf: bool = False) -> Optional[float]:
        """The nominal bits per weight whose predicted size is `size` (no blocks dropped): the aim's budget."""
        a, c = self.size_fit
        raw = (size - c) / a
        if gguf:
            return raw * 8 / self.spec.params
        lin = self._linear_numel()
        total = self.base_size or self.spec.params * self.spec.bytes_per_param
        return (raw - total + lin * self.spec.bytes_per_param) * 8 / lin if lin else None

    # ---- kld -------------------------------------------------------------------------------------------------
    def predict(self, strategy: Strategy) -> Prediction:
        f = features(strategy, self.spec)
        size = self.size(f)
        how_size = ("size: the shapes at the nominal bits" + (", corrected by a line fitted to the measured sizes"
                                                              if self.size_fit != (1.0, 0.0) else ""))
        if self.coef is None or math.isnan(f["bits"]):
            why = (f"fewer than {MIN_POINTS} measured points ({self.n})" if self.coef is None
                   else "the quantizer's bits are not known from its params")
            return Prediction(size=size, n=self.n, how=f"no kld prediction: {why}; {how_size}")
        unseen = [c for c in f if c not in ("bits", "kept") and c not in self.cols]
        # a feature no measured point has takes its prior effect (none where PRIOR has none)
        log_k = float(_row(f, self.cols) @ self.coef) + sum(PRIOR.get(c, 0.0) * f[c] for c in unseen)
        # capped at 10 nats/token: far past any --max-kld, where the linear terms stop meaning anything
        k = float(math.exp(min(log_k, math.log(10.0))))
        how = (f"estimate: ridge regression of log kld on the strategy's features over {self.n} measured points of "
               f"this run (recipes and episodes)" + (f"; features never measured, at their prior effect: "
                                                     f"{', '.join(unseen)}" if unseen else "") + f"; {how_size}")
        return Prediction(kld=k, size=size, log_sd=self.log_sd, n=self.n, how=how)


def spearman(pred: Sequence[float], measured: Sequence[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None below 3 pairs. By hand: scipy is not a
    dependency, and ranking a few dozen numbers is all it takes."""
    if len(pred) < 3 or len(pred) != len(measured):
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort()
        r = np.empty(len(a))
        i = 0
        while i < len(a):
            j = i
            while j + 1 < len(a) and a[order[j + 1]] == a[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2
            i = j + 1
        return r

    x, y = ranks(pred), ranks(measured)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])
