"""The causal Wiener filter: ridge regression of velocity on the last L bins of sqrt(counts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self

import numpy as np

from rpnt_core.decoder import DecoderInfo
from rpnt_core.evaluate.baselines.common import Baseline, check_fit_inputs, fingerprint, sqrt_features
from rpnt_core.evaluate.metrics import r2_score

__all__ = ["WienerFilter"]


class WienerFilter(Baseline):
    """Causal Wiener filter: ridge regression of velocity on the last L bins of sqrt(counts).

    ŷ_t = b + Σ_{l=0}^{L-1} sqrt(x_{t-l}) · W_l, with W (L, N, D) and intercept b (D,) (the
    intercept is not penalised: features and targets are centred on the train split).  Bins
    before the stream start (t − l < 0) are treated as **zero counts**, in ``predict``, in
    ``step`` after ``reset()`` and in the training design matrix alike; so a stream's first L−1
    outputs see a partly empty history, exactly as the online decoder would.

    ``fit`` hyper-parameters: ``n_lags`` (L, default 10) and ``rel_alphas``: the ridge penalty is
    alpha = r · tr(XᵀX)/p (p = L·N, X the centred train design), r chosen from ``rel_alphas``
    by validation R² (the validation split streamed from a reset).  The weights are those fitted
    on the train split with the chosen alpha; ``seed`` is unused (the fit is deterministic).
    """

    name: ClassVar[str] = "wiener"
    DEFAULT_REL_ALPHAS: ClassVar[tuple[float, ...]] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)

    def __init__(
        self, *, weights: np.ndarray, bias: np.ndarray, bin_s: float, extra: dict | None = None
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)  # (L, N, D)
        b = np.asarray(bias, dtype=np.float64)  # (D,)
        if w.ndim != 3 or b.shape != (w.shape[2],):
            raise ValueError(f"weights (L, N, D) and bias (D,) expected, got {w.shape}, {b.shape}")
        self.weights, self.bias = w, b
        self._w_flat = w.reshape(-1, w.shape[2])  # (L·N, D), lag-major like the ring buffer
        self._info = DecoderInfo(
            n_channels=w.shape[1],
            n_outputs=w.shape[2],
            bin_s=float(bin_s),
            name=self.name,
            version="1",
            fingerprint=fingerprint(w, b),
            extra=dict(extra or {}),
        )
        self._hist = np.zeros((w.shape[0], w.shape[1]))  # (L, N), row l = sqrt counts of bin t−l
        self.reset()

    @property
    def n_lags(self) -> int:
        return self.weights.shape[0]

    def reset(self) -> None:
        self._hist[:] = 0.0  # zero counts before the stream start

    def step(self, counts: np.ndarray) -> np.ndarray:
        s = sqrt_features(self._check_step(counts))  # (N,)
        self._hist[1:] = self._hist[:-1]  # O(L·N), independent of stream length
        self._hist[0] = s
        return (self.bias + self._hist.reshape(-1) @ self._w_flat).astype(np.float32)  # (D,)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        return self._predict_sqrt(sqrt_features(self._check_block(counts))).astype(np.float32)

    def _predict_sqrt(self, s: np.ndarray) -> np.ndarray:
        """(T, N) sqrt counts → (T, D) float64, zero history before bin 0."""
        out = np.broadcast_to(self.bias, (s.shape[0], self.bias.shape[0])).copy()  # (T, D)
        for lag in range(min(self.n_lags, s.shape[0])):
            out[lag:] += s[: s.shape[0] - lag] @ self.weights[lag]
        return out

    @staticmethod
    def _lagged(s: np.ndarray, n_lags: int, start: int, stop: int) -> np.ndarray:
        """Design rows for bins [start, stop): (stop−start, L·N), lag-major, zeros before bin 0."""
        n = s.shape[1]
        x = np.zeros((stop - start, n_lags * n))
        for lag in range(n_lags):
            lo = max(start, lag)
            if lo < stop:
                x[lo - start :, lag * n : (lag + 1) * n] = s[lo - lag : stop - lag]
        return x

    @classmethod
    def fit(
        cls,
        *,
        train_counts: np.ndarray,
        train_velocity: np.ndarray,
        val_counts: np.ndarray,
        val_velocity: np.ndarray,
        bin_s: float,
        seed: int = 0,
        n_lags: int = 10,
        rel_alphas: Sequence[float] = DEFAULT_REL_ALPHAS,
        chunk: int = 4096,
    ) -> Self:
        del seed  # deterministic
        tc, tv, vc, vv = check_fit_inputs(train_counts, train_velocity, val_counts, val_velocity, bin_s)
        if n_lags < 1 or not rel_alphas or min(rel_alphas) <= 0:
            raise ValueError("n_lags must be ≥ 1 and rel_alphas a non-empty list of positive numbers")
        s = sqrt_features(tc)  # (T, N)
        t_train, n = s.shape
        p = n_lags * n
        # Accumulate XᵀX and XᵀY in time chunks (memory O(chunk·L·N)), then centre.
        g = np.zeros((p, p))
        xty = np.zeros((p, tv.shape[1]))
        xsum = np.zeros(p)
        for start in range(0, t_train, chunk):
            stop = min(start + chunk, t_train)
            x = cls._lagged(s, n_lags, start, stop)  # (chunk, p)
            g += x.T @ x
            xty += x.T @ tv[start:stop]
            xsum += x.sum(axis=0)
        mu_x, mu_y = xsum / t_train, tv.mean(axis=0)  # (p,), (D,)
        g -= t_train * np.outer(mu_x, mu_x)
        xty -= t_train * np.outer(mu_x, mu_y)
        g = 0.5 * (g + g.T)
        evals, evecs = np.linalg.eigh(g)  # one decomposition serves every alpha
        evals = np.clip(evals, 0.0, None)
        proj = evecs.T @ xty  # (p, D)
        scale = max(float(np.trace(g)) / p, np.finfo(np.float64).tiny)
        sv = sqrt_features(vc)
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        scores: dict[float, float] = {}
        for r in rel_alphas:
            alpha = float(r) * scale
            w = evecs @ (proj / (evals + alpha)[:, None])  # (p, D)
            b = mu_y - mu_x @ w
            model = cls(weights=w.reshape(n_lags, n, -1), bias=b, bin_s=bin_s)
            score = r2_score(vv, model._predict_sqrt(sv))
            scores[float(r)] = score
            if best is None or score > best[0]:
                best = (score, float(r), w, b)
        assert best is not None
        score, r, w, b = best
        extra = {
            "n_lags": n_lags,
            "rel_alpha": r,
            "alpha": r * scale,
            "val_r2": score,
            "val_r2_by_rel_alpha": scores,
            "n_train_bins": t_train,
        }
        return cls(weights=w.reshape(n_lags, n, -1), bias=b, bin_s=bin_s, extra=extra)
