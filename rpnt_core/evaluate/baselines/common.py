"""What every classic baseline shares: input checks, the sqrt feature, the fingerprint, ``info``."""

from __future__ import annotations

import hashlib
import math
from typing import ClassVar

import numpy as np

from rpnt_core.decoder import DecoderInfo, check_count_block, check_counts

__all__ = ["Baseline", "check_fit_inputs", "fingerprint", "sqrt_features"]


def sqrt_features(counts_f32: np.ndarray) -> np.ndarray:
    """sqrt of validated float32 counts, in float64 — the same arithmetic for a bin or a block.

    Shape: (..., N) → (..., N).
    """
    return np.sqrt(counts_f32.astype(np.float64))


def _check_split(
    name: str, counts: np.ndarray, velocity: np.ndarray, n_channels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One split's (counts float32 (T, N), velocity float64 (T, D)), validated."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"{name}_counts: expected (T, N), got shape {counts.shape}")
    c = check_count_block(counts, counts.shape[1] if n_channels is None else n_channels)
    v = np.asarray(velocity, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"{name}_velocity: expected (T, D), got shape {v.shape}")
    if v.shape[0] != c.shape[0]:
        raise ValueError(f"{name}: counts have {c.shape[0]} bins but velocity has {v.shape[0]}")
    if c.shape[0] < 2 or v.shape[1] == 0:
        raise ValueError(f"{name}: need at least 2 bins and 1 output dim, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}_velocity: contains NaN or inf")
    return c, v


def check_fit_inputs(
    train_counts: np.ndarray,
    train_velocity: np.ndarray,
    val_counts: np.ndarray,
    val_velocity: np.ndarray,
    bin_s: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The train and validation splits, checked against each other.

    Args:
        train_counts, val_counts: (T, N) non-negative counts, the same N.
        train_velocity, val_velocity: (T, D) finite targets, the same D, T matching the counts.
        bin_s: bin width in seconds.
    Returns:
        (train counts float32, train velocity float64, val counts float32, val velocity float64).
    Raises:
        ValueError: naming the split and array for any mismatch, fewer than 2 bins, NaN/inf, or a
            non-positive ``bin_s``.
    """
    tc, tv = _check_split("train", train_counts, train_velocity)
    vc, vv = _check_split("val", val_counts, val_velocity, n_channels=tc.shape[1])
    if vv.shape[1] != tv.shape[1]:
        raise ValueError(f"val_velocity has {vv.shape[1]} dims, train_velocity {tv.shape[1]}")
    if not (bin_s > 0 and math.isfinite(bin_s)):
        raise ValueError(f"bin_s must be a positive number of seconds, got {bin_s}")
    return tc, tv, vc, vv


def fingerprint(*arrays: np.ndarray) -> str:
    """16 hex digits of the SHA-256 of the arrays' bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class Baseline:
    """Common plumbing: ``info``, input checks and ``predict`` as documented in the package."""

    name: ClassVar[str] = ""
    _info: DecoderInfo

    @property
    def info(self) -> DecoderInfo:
        return self._info

    def _check_step(self, counts: np.ndarray) -> np.ndarray:
        return check_counts(counts, self._info.n_channels)  # (N,) float32

    def _check_block(self, counts: np.ndarray) -> np.ndarray:
        return check_count_block(counts, self._info.n_channels)  # (T, N) float32
