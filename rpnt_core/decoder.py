"""The one decoder contract (think FALCON's ``reset / predict``).

Everything that turns binned spike counts into velocity implements :class:`Decoder`: the torch
RPNT model (:class:`rpnt_core.model.TorchDecoder`), the ONNX Runtime engines in ``exporters``,
and every classic baseline in :mod:`rpnt_core.evaluate.baselines`.  Offline evaluation, replay
and the streaming daemon all consume it, which is how "offline R² = what the daemon would have
said" stays true.

Contract
--------
- ``info``: static facts about the decoder (:class:`DecoderInfo`).
- ``reset()``: forget all history; the next ``step`` is the first bin of a new stream.
- ``step(counts) -> velocity``: ``counts`` is one bin, shape (N,) with N = ``info.n_channels``,
  any real dtype holding non-negative counts; returns a float32 array of shape (D,) with
  D = ``info.n_outputs``, in the units of the training target.  The result for bin t depends
  only on bins ≤ t (causal), and the cost of a call does not grow with stream length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, kw_only=True)
class DecoderInfo:
    """Static facts about a decoder.

    Args:
        n_channels: N, the counts per bin ``step`` reads.
        n_outputs: D, the values per bin ``step`` returns.
        bin_s: the bin width in seconds the decoder was trained at.
        name: what kind of decoder (``"rpnt"``, ``"wiener"``, …).
        version: the decoder's format or model version.
        fingerprint: identifies the weights (equal weights, equal fingerprint).
        extra: anything else worth reporting (hyper-parameters, validation scores).
    """

    n_channels: int
    n_outputs: int
    bin_s: float
    name: str = ""
    version: str = ""
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Decoder(Protocol):
    """The decoder contract (module docstring): ``info``, ``reset()``, ``step(counts)``."""

    @property
    def info(self) -> DecoderInfo: ...

    def reset(self) -> None: ...

    def step(self, counts: np.ndarray) -> np.ndarray: ...


def check_counts(counts: np.ndarray, n_channels: int) -> np.ndarray:
    """Validate one bin of counts for a decoder.

    Args:
        counts: (N,) counts, any real dtype.
        n_channels: the N the decoder reads.
    Returns:
        The counts as float32, shape (N,).
    Raises:
        ValueError: ``counts: …`` for a wrong shape, non-finite or negative values.
    """
    arr = np.asarray(counts)
    if arr.shape != (n_channels,):
        raise ValueError(f"counts: expected shape ({n_channels},), got {arr.shape}")
    return _finite_non_negative(arr)


def check_count_block(counts: np.ndarray, n_channels: int) -> np.ndarray:
    """Validate a block of bins exactly as :func:`check_counts` does one bin.

    Shape: (T, N) → (T, N) float32.
    """
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.shape[1] != n_channels:
        raise ValueError(f"counts: expected shape (T, {n_channels}), got {arr.shape}")
    return _finite_non_negative(arr)


def _finite_non_negative(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("counts: contains NaN or inf")
    if np.any(arr < 0):
        raise ValueError("counts: contains negative values")
    return arr


def decode_stream(decoder: Decoder, counts: np.ndarray, *, reset: bool = True) -> np.ndarray:
    """Run ``decoder`` causally over a block of bins, one ``step`` per bin.

    Args:
        decoder: any :class:`Decoder`.
        counts: (T, N) counts.
        reset: start a new stream first (else continue from the decoder's state).
    Returns:
        (T, D) float32, row t the output of bin t's ``step``.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts: expected (T, N), got shape {counts.shape}")
    if reset:
        decoder.reset()
    out = np.empty((counts.shape[0], decoder.info.n_outputs), dtype=np.float32)
    for t in range(counts.shape[0]):
        out[t] = decoder.step(counts[t])
    return out
