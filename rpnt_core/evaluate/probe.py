"""Linear probes: how much velocity a representation carries, read out by causal ridge regression.

``linear_probe_r2(features, velocity, splits)`` fits ŷ_t = b + Σ_{l<L} f_{t-l}·W_l (lags L,
zeros before bin 0, as the Wiener filter) on the train split, picks the ridge penalty
(``rel_alphas`` × tr(XᵀX)/p) by validation R², and returns the test R² (pooled,
variance-weighted, :func:`r2_score`).  Run on an encoder's ``latent`` (T, d) it asks whether
pretraining made velocity linearly readable; run on sqrt(counts) it is the reference the latent
should beat (the Wiener filter's features).  The features must themselves be causal (an encoder
streamed from bin 0 is).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.splits import Splits
from .metrics import r2_score

__all__ = ["linear_probe_r2", "ridge_by_validation"]


def _lagged(f: np.ndarray, n_lags: int) -> np.ndarray:
    """(T, d) → (T, L·d): row t holds f_t, f_{t-1}, ..., zeros before bin 0."""
    out = np.zeros((f.shape[0], n_lags * f.shape[1]))
    for lag in range(n_lags):
        out[lag:, lag * f.shape[1] : (lag + 1) * f.shape[1]] = f[: f.shape[0] - lag]
    return out


def ridge_by_validation(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    rel_alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
) -> dict:
    """Ridge regression y ≈ x·W + b, the penalty chosen by validation R².

    The intercept is unpenalised (both sides centred on the train rows); the penalty is
    alpha = r · tr(XᵀX)/p with r from ``rel_alphas``.

    Args:
        x_train, x_val: (T, p) features.
        y_train, y_val: (T, D) targets.
        rel_alphas: the relative penalties tried.
    Returns:
        ``{"weights": W (p, D), "bias": b (D,), "val_r2", "rel_alpha"}`` of the best penalty.
    """
    x, y = np.asarray(x_train, np.float64), np.asarray(y_train, np.float64)  # (T, p), (T, D)
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc = x - mu_x
    g = xc.T @ xc
    xty = xc.T @ (y - mu_y)
    scale = max(float(np.trace(g)) / g.shape[0], np.finfo(np.float64).tiny)
    best = None
    for r in rel_alphas:
        w = np.linalg.solve(g + r * scale * np.eye(g.shape[0]), xty)  # (p, D)
        b = mu_y - mu_x @ w
        val = r2_score(y_val, np.asarray(x_val, np.float64) @ w + b)
        if best is None or val > best["val_r2"]:
            best = {"weights": w, "bias": b, "val_r2": val, "rel_alpha": r}
    return best


def linear_probe_r2(
    features: np.ndarray,
    velocity: np.ndarray,
    splits: Splits,
    *,
    n_lags: int = 5,
    rel_alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
) -> dict:
    """Test R² of a causal ridge read-out of ``velocity`` from ``features`` (module docstring).

    Args:
        features: (T, d), causal themselves.
        velocity: (T, D).
        splits: fit on ``train``, choose the penalty on ``val``, score ``test``.
        n_lags: L, the bins of history read (zeros before bin 0).
        rel_alphas: the relative penalties tried (:func:`ridge_by_validation`).
    Returns:
        ``{"test_r2", "val_r2", "rel_alpha", "n_lags"}``.
    Raises:
        ValueError: misshapen or non-finite inputs.
    """
    f = np.asarray(features, dtype=np.float64)
    v = np.asarray(velocity, dtype=np.float64)
    if f.ndim != 2 or v.ndim != 2 or f.shape[0] != v.shape[0]:
        raise ValueError(f"features (T, d) and velocity (T, D) expected, got {f.shape} and {v.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features: contain NaN or inf")
    x = _lagged(f, n_lags)  # (T, L·d)
    (lo, hi), (vlo, vhi), (tlo, thi) = splits.train, splits.val, splits.test
    fit = ridge_by_validation(x[lo:hi], v[lo:hi], x[vlo:vhi], v[vlo:vhi], rel_alphas=rel_alphas)
    return {
        "test_r2": r2_score(v[tlo:thi], x[tlo:thi] @ fit["weights"] + fit["bias"]),
        "val_r2": fit["val_r2"],
        "rel_alpha": fit["rel_alpha"],
        "n_lags": n_lags,
    }
