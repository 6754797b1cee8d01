"""Fixed-length windows of bins inside a ``[start, stop)`` range.

A window is identified by its start index ``s`` and covers bins ``[s, s + length)``.  Windows
never cross the range boundaries (``start <= s`` and ``s + length <= stop``), so windows drawn
from a train split never touch validation or test bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WindowSampler", "make_windows"]


def _check_int(name: str, v: object, *, minimum: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name}: must be an int >= {minimum}, got {v!r}")
    return int(v)


def make_windows(
    n_bins: int,
    *,
    length: int,
    stride: int,
    start: int = 0,
    stop: int | None = None,
    include_end: bool = False,
) -> np.ndarray:
    """Start indices of windows of ``length`` bins every ``stride`` bins in ``[start, stop)``.

    Args:
        n_bins: the session length.
        length: bins per window.
        stride: bins between window starts.
        start, stop: the range to cover (``stop`` ``None``: ``n_bins``).
        include_end: add a last window ending exactly at ``stop`` when the stride leaves a tail
            uncovered.
    Returns:
        (W,) int64 starts; empty when the range is shorter than ``length``.
    Raises:
        ValueError: naming the argument that is out of range.
    """
    n_bins = _check_int("n_bins", n_bins, minimum=1)
    length = _check_int("length", length, minimum=1)
    stride = _check_int("stride", stride, minimum=1)
    start = _check_int("start", start, minimum=0)
    stop = n_bins if stop is None else _check_int("stop", stop, minimum=1)
    if not start < stop <= n_bins:
        raise ValueError(
            f"stop: expected start < stop <= n_bins, got start={start} stop={stop} n_bins={n_bins}"
        )
    last = stop - length
    if last < start:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(start, last + 1, stride, dtype=np.int64)  # (W,)
    if include_end and starts[-1] != last:
        starts = np.append(starts, last)
    return starts


@dataclass(frozen=True, kw_only=True)
class WindowSampler:
    """Uniform random window starts in ``[start, stop - length]`` (training windows)."""

    start: int
    stop: int
    length: int

    def __post_init__(self) -> None:
        start = _check_int("start", self.start, minimum=0)
        length = _check_int("length", self.length, minimum=1)
        stop = _check_int("stop", self.stop, minimum=1)
        if stop - start < length:
            raise ValueError(f"length: {length} bins do not fit in range [{start}, {stop})")

    @property
    def n_positions(self) -> int:
        """How many distinct window starts there are."""
        return self.stop - self.length - self.start + 1

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 start indices drawn uniformly (with replacement) with ``rng``."""
        n = _check_int("n", n, minimum=0)
        return rng.integers(self.start, self.stop - self.length + 1, size=n, dtype=np.int64)
