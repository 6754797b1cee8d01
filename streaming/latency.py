"""Latency histograms for the hot path, and exact percentiles for reports.

:class:`Histogram` is a fixed-size log-linear histogram of integer nanoseconds (32 sub-buckets per
power of two: any recorded value is reported within 1/32 ≈ 3 % above its true value, exact below
64 ns; count, sum, min and max are exact).  Recording is a few integer operations and one list
increment — cheap enough for every bin — and memory never grows.  Percentiles are computed by
the reader (:meth:`Histogram.summary`), not by the loop.

Thread model: one writer (the loop thread); readers in other threads call :meth:`copy` (a list
copy under the GIL) and summarise the copy.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

_SUB = 32  # sub-buckets per power of two
_MAX_NS = (1 << 40) - 1  # ≈ 18 minutes; larger values are clamped (and max still records them)
N_BUCKETS = ((_MAX_NS.bit_length() - 6) << 5) + 64
QUANTILES = (0.5, 0.9, 0.99, 0.999)


def bucket_of(v: int) -> int:
    """Bucket index of a value in ns (negative values count as 0)."""
    if v < 64:
        return v if v > 0 else 0
    if v > _MAX_NS:
        v = _MAX_NS
    e = v.bit_length() - 6
    return (e << 5) + (v >> e)


def bucket_bounds(i: int) -> tuple[int, int]:
    """[lo, hi) in ns of bucket ``i``."""
    if i < 64:
        return i, i + 1
    e = (i >> 5) - 1
    m = i - (e << 5)
    return m << e, (m + 1) << e


class Histogram:
    """Log-linear latency histogram over integer nanoseconds (see the module docstring)."""

    __slots__ = ("buckets", "count", "total", "min", "max")

    def __init__(self) -> None:
        self.buckets = [0] * N_BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, v: int) -> None:
        """Count one value ``v`` in ns (the writer thread only; :func:`bucket_of`, inlined)."""
        if v < 64:
            i = v if v > 0 else 0
        else:
            e = (v if v <= _MAX_NS else _MAX_NS).bit_length() - 6
            i = (e << 5) + ((v if v <= _MAX_NS else _MAX_NS) >> e)
        self.buckets[i] += 1
        if self.count == 0 or v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        self.count += 1
        self.total += v

    def copy(self) -> "Histogram":
        h = Histogram()
        h.buckets = list(self.buckets)  # one C-level copy: consistent with itself
        h.count, h.total, h.min, h.max = sum(h.buckets), self.total, self.min, self.max
        return h

    def quantile_ns(self, q: float) -> int:
        """Upper edge of the bucket holding the ``q`` quantile, capped at the exact maximum."""
        if self.count == 0:
            return 0
        rank = max(1, int(np.ceil(q * self.count)))
        acc = 0
        for i, c in enumerate(self.buckets):
            if c:
                acc += c
                if acc >= rank:
                    return min(bucket_bounds(i)[1] - 1, self.max) if i >= 64 else min(i, self.max)
        return self.max

    def summary(self) -> dict:
        """``count``, ``mean_ms``, ``p50_ms`` … ``p99.9_ms``, ``min_ms``, ``max_ms`` (plain dict)."""
        out: dict = {"count": self.count}
        if self.count == 0:
            return out
        out["mean_ms"] = self.total / self.count / 1e6
        out["min_ms"] = self.min / 1e6
        for q in QUANTILES:
            out[f"p{_qname(q)}_ms"] = self.quantile_ns(q) / 1e6
        out["max_ms"] = self.max / 1e6
        return out

    def cumulative(self, edges_ms: Sequence[float]) -> list[tuple[float, int]]:
        """(le_ms, count ≤ le) pairs for Prometheus-style buckets (bucket-resolution accurate)."""
        out = []
        acc = 0
        i = 0
        for le in edges_ms:
            lim = int(le * 1e6)
            while i < N_BUCKETS and bucket_bounds(i)[1] - 1 <= lim:
                acc += self.buckets[i]
                i += 1
            out.append((float(le), acc))
        return out


def _qname(q: float) -> str:
    s = f"{q * 100:.1f}".rstrip("0").rstrip(".")
    return s


STAGES = ("parse", "infer", "publish", "daemon")
STAGE_DOC = {
    "parse": "bin-closing message off the socket → bin counts final (validate, bin)",
    "infer": "bin counts final → decoder.step returned",
    "publish": "decoder.step returned → prediction handed to the PUB socket",
    "daemon": "bin-closing message off the socket → prediction handed to the PUB socket",
}


class StageHistograms:
    """One :class:`Histogram` per hot-path stage (:data:`STAGES`)."""

    def __init__(self, stages: Iterable[str] = STAGES) -> None:
        self.h = {s: Histogram() for s in stages}

    def summary(self) -> dict:
        return {s: h.copy().summary() for s, h in self.h.items()}


# ---------------------------------------------------------------------------- exact (reports)
def percentiles_ms(values_ns: np.ndarray, quantiles: Sequence[float] = QUANTILES) -> dict:
    """Exact percentiles of an array of ns values (NaNs ignored) → ``p50_ms`` … plus mean/max/count."""
    v = np.asarray(values_ns, dtype=np.float64)
    v = v[np.isfinite(v)]
    out: dict = {"count": int(v.size)}
    if v.size == 0:
        return out
    out["mean_ms"] = float(v.mean() / 1e6)
    out["min_ms"] = float(v.min() / 1e6)
    for q in quantiles:
        out[f"p{_qname(q)}_ms"] = float(np.quantile(v, q, method="higher") / 1e6)
    out["max_ms"] = float(v.max() / 1e6)
    return out
