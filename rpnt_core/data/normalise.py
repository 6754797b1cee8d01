"""Per-channel statistics of sqrt spike counts: what input normalisation (``RPNTConfig.input_norm``)
standardises by.

``sqrt_count_stats(counts)`` → (mean, scale), each (N,) float32, of sqrt(counts) over the given
bins.  The scale is floored at :data:`SCALE_FLOOR`: a Poisson channel's sqrt count has a standard
deviation of about 0.5 when it fires often and ≈ √λ when it fires λ ≪ 1 spikes per bin, so 0.1
(λ ≈ 0.01, under one spike in 100 bins) is the line below which a channel is treated as silent
rather than amplified: a channel silent in the statistics' bins that wakes up later then shows
up ten-fold, not a thousand-fold.

Only spike counts are read — never behaviour — so the statistics may come from any unlabelled bins
of the recording being decoded (a new day's bins before its test part, say) without spending a
label.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SCALE_FLOOR", "sqrt_count_stats"]

SCALE_FLOOR = 0.1


def sqrt_count_stats(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, max(std, SCALE_FLOOR)) of sqrt(counts) per channel over the bins of ``counts`` (T, N).

    Raises ``ValueError`` starting with ``counts:`` for a non-2-D array, fewer than 2 bins, or
    negative / non-finite entries."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 2:
        raise ValueError(f"counts: expected (T, N) with T ≥ 2 bins, got shape {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts: must be finite and non-negative")
    s = np.sqrt(c)
    return s.mean(0).astype(np.float32), np.maximum(s.std(0), SCALE_FLOOR).astype(np.float32)
