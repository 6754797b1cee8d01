"""R², the one scoring function of offline evaluation.

Convention (FALCON's, i.e. scikit-learn's ``multioutput="variance_weighted"``)
------------------------------------------------------------------------------
R² is *pooled over the evaluation bins of a session* and *variance-weighted across output
dimensions*::

    R² = 1 − Σ_d Σ_t (y[t, d] − ŷ[t, d])² / Σ_d Σ_t (y[t, d] − ȳ_d)²

where ȳ_d is the mean of dimension d over the evaluated bins (not over the training split).
Equivalently, R² is the average of the per-dimension R²_d weighted by each dimension's
target variance, so a high-variance dimension counts for more than a low-variance one; it is
*not* the plain mean of :func:`r2_per_dim`.

Inputs are (T, D) or (T,) (taken as D = 1), any real dtype; sums are accumulated in float64.
``ValueError`` is raised for: shapes that differ as given (no broadcasting; (T,) vs (T, 1) is
a mismatch), more than 2 dimensions, an empty input (T = 0 or D = 0), NaN/inf anywhere, and a
target dimension whose evaluated bins are all equal (zero variance: R²_d is undefined, and the
two usual pooled conventions — the formula above and scikit-learn's, which drops such a
dimension's error — would disagree, so we refuse rather than pick silently).
"""

from __future__ import annotations

import numpy as np

__all__ = ["r2_score", "r2_per_dim"]


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    """``a`` as a float64 (T, D) array; (T,) becomes (T, 1)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    elif arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (T, D) or (T,), got {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _sse_sst(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated per-dimension sums: SSE_d = Σ_t (y−ŷ)², SST_d = Σ_t (y−ȳ_d)², both (D,) float64."""
    if np.shape(y_true) != np.shape(y_pred):  # compared as given: (T,) vs (T, 1) is a mismatch
        raise ValueError(f"y_true and y_pred differ in shape: {np.shape(y_true)} vs {np.shape(y_pred)}")
    yt = _as_2d("y_true", y_true)  # (T, D)
    yp = _as_2d("y_pred", y_pred)  # (T, D)
    if yt.shape[0] == 0 or yt.shape[1] == 0:
        raise ValueError(f"empty input: shape {np.shape(y_true)}")
    if not np.all(np.isfinite(yt)):
        raise ValueError("y_true: contains NaN or inf")
    if not np.all(np.isfinite(yp)):
        raise ValueError("y_pred: contains NaN or inf")
    sse = np.sum((yt - yp) ** 2, axis=0)  # (D,)
    sst = np.sum((yt - yt.mean(axis=0)) ** 2, axis=0)  # (D,)
    constant = (np.ptp(yt, axis=0) == 0) | (sst == 0)  # (D,)
    if np.any(constant):
        dims = np.flatnonzero(constant).tolist()
        raise ValueError(
            f"y_true: zero variance over the evaluated bins in output dim(s) {dims}; R² is undefined"
        )
    return sse, sst


def r2_per_dim(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-dimension R²_d = 1 − SSE_d / SST_d over the evaluated bins.

    Args:
        y_true, y_pred: (T, D) or (T,).
    Returns:
        (D,) float64.
    Raises:
        ValueError: as described in the module docstring (shape mismatch, empty, non-finite,
            zero-variance target dimension).
    """
    sse, sst = _sse_sst(y_true, y_pred)
    return 1.0 - sse / sst


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pooled, variance-weighted R² = 1 − Σ_d SSE_d / Σ_d SST_d (FALCON's convention).

    Args:
        y_true, y_pred: (T, D) or (T,), the evaluated bins of one session.
    Returns:
        1 for perfect, 0 for "as good as predicting each dimension's evaluated-bin mean";
        unbounded below.
    Raises:
        ValueError: as described in the module docstring.
    """
    sse, sst = _sse_sst(y_true, y_pred)
    return float(1.0 - sse.sum() / sst.sum())
