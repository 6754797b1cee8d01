"""A bounded ring of what the daemon decoded: counts per bin, and kinematics per bin when the rig
streams them.  For calibration ("the last N seconds of what the daemon itself decoded") and for
warming a swapped-in decoder.

Writes come from the loop thread only (one row per decoded bin, one per kinematics bin); reads come
from any thread.  A small lock guards each write of one row and each read of one chunk of rows, so a
reader copying minutes of history never holds the loop up for more than one chunk.

Rows are addressed by a *serial* (the n-th decoded bin since the daemon started, across streams);
each row also records its stream (epoch) and bin index.  Kinematics name a bin of the current
stream; they may arrive before their bin is decoded (kept in a bounded pending map and attached
when the bin is written) or after (attached in place while the row is still in the ring).
"""

from __future__ import annotations

import threading

import numpy as np

_CHUNK = 1024  # rows copied per lock hold when reading


class HistoryRing:
    """Last ``capacity`` decoded bins: counts (C, N) int32, kinematics (C, D) float32."""

    def __init__(self, *, capacity: int, n_channels: int, n_kinematics: int, max_pending: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be ≥ 1, got {capacity}")
        self.capacity = int(capacity)
        self.n_channels = int(n_channels)
        self.n_kinematics = int(n_kinematics)
        self.max_pending = int(max_pending)
        self._counts = np.zeros((capacity, n_channels), dtype=np.int32)  # (C, N)
        self._kin = np.zeros((capacity, n_kinematics), dtype=np.float32)  # (C, D)
        self._has_kin = np.zeros(capacity, dtype=bool)  # (C,)
        self._bins = np.zeros(capacity, dtype=np.int64)  # (C,) bin index of each row
        self._epochs = np.zeros(capacity, dtype=np.int64)  # (C,)
        self._serials = np.full(capacity, -1, dtype=np.int64)  # (C,) serial of each row (−1 = empty)
        self._lock = threading.Lock()
        self._next = 0  # serial of the next row
        self._epoch = 0
        self._epoch_first_bin = 0
        self._epoch_first_serial = 0
        # (epoch, bin) → (D,) kinematics that came early
        self._pending: dict[tuple[int, int], np.ndarray] = {}
        self.kinematics_stored = 0
        self.kinematics_stale = 0  # named a bin no longer in the ring (or of a past stream)
        self.kinematics_dropped = 0  # pending map overflow

    # ------------------------------------------------------------------ writes (loop thread)
    def append(self, epoch: int, k: int, counts: np.ndarray) -> None:
        """Record decoded bin ``k`` of stream ``epoch`` (counts (N,))."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._epoch_first_bin = k
            self._epoch_first_serial = self._next
            for key in [key for key in self._pending if key[0] < epoch]:
                del self._pending[key]
        kin = self._pending.pop((epoch, k), None) if self._pending else None
        s = self._next
        i = s % self.capacity
        with self._lock:
            self._counts[i] = counts
            self._bins[i] = k
            self._epochs[i] = epoch
            self._serials[i] = s
            if kin is None:
                self._has_kin[i] = False
            else:
                self._kin[i] = kin
                self._has_kin[i] = True
            self._next = s + 1
        if kin is not None:
            self.kinematics_stored += 1

    def add_kinematics(self, epoch: int, first: int, values: np.ndarray) -> None:
        """Kinematics ``values`` (n, D) for bins ``first … first+n−1`` of stream ``epoch`` (the stream that
        is open, or the one about to start).  Rows already in the ring are filled in place (one slice
        per wrap), later ones wait in the pending map, older ones count as stale."""
        n = values.shape[0]
        if epoch != self._epoch:  # no bin of that stream recorded yet
            if epoch < self._epoch:
                self.kinematics_stale += n
            else:
                for i in range(n):
                    self._pend(epoch, first + i, values[i])
            return
        s0 = self._epoch_first_serial + (first - self._epoch_first_bin)
        oldest = max(self._epoch_first_serial, self._next - self.capacity)
        lo, hi = max(s0, oldest), min(s0 + n, self._next)  # serials present in the ring
        self.kinematics_stale += max(0, min(oldest, s0 + n) - s0)
        s = lo
        while s < hi:
            e = min(hi, (s // self.capacity + 1) * self.capacity)
            i0 = s % self.capacity
            with self._lock:
                self._kin[i0 : i0 + e - s] = values[s - s0 : e - s0]
                self._has_kin[i0 : i0 + e - s] = True
            s = e
        self.kinematics_stored += max(0, hi - lo)
        for s in range(max(s0, self._next), s0 + n):
            self._pend(epoch, first + (s - s0), values[s - s0])

    def _pend(self, epoch: int, k: int, values: np.ndarray) -> None:
        key = (epoch, k)
        if len(self._pending) >= self.max_pending and key not in self._pending:
            self.kinematics_dropped += 1  # full: the newest is dropped (O(1), bounded)
            return
        self._pending[key] = np.array(values, dtype=np.float32)

    # ------------------------------------------------------------------ reads (any thread)
    def _rows(self, first_serial: int, stop_serial: int) -> tuple[np.ndarray, ...]:
        """Copies of rows with serials in [first, stop) that are still in the ring, in order."""
        parts: list[tuple[np.ndarray, ...]] = []
        s = first_serial
        while s < stop_serial:
            e = min(stop_serial, s + _CHUNK, (s // self.capacity + 1) * self.capacity)
            i0, i1 = s % self.capacity, (e - 1) % self.capacity + 1
            with self._lock:
                part = (
                    self._serials[i0:i1].copy(),
                    self._epochs[i0:i1].copy(),
                    self._bins[i0:i1].copy(),
                    self._counts[i0:i1].copy(),
                    self._kin[i0:i1].copy(),
                    self._has_kin[i0:i1].copy(),
                )
            keep = part[0] == np.arange(s, e)  # rows overwritten meanwhile are newer: drop them
            parts.append(tuple(a[keep] for a in part))
            s = e
        if not parts:
            return (
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                np.zeros((0, self.n_channels), np.int32),
                np.zeros((0, self.n_kinematics), np.float32),
                np.zeros(0, bool),
            )
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(6))

    def recent(self, n_bins: int) -> dict[str, np.ndarray]:
        """The last ``n_bins`` decoded bins (fewer if the ring holds fewer), oldest first:
        ``serial, epoch, bin`` (T,), ``counts`` (T, N) int32, ``kinematics`` (T, D), ``has_kinematics`` (T,)."""
        stop = self._next
        first = max(0, stop - min(int(n_bins), self.capacity))
        ser, ep, bins, counts, kin, has = self._rows(first, stop)
        return {
            "serial": ser,
            "epoch": ep,
            "bin": bins,
            "counts": counts,
            "kinematics": kin,
            "has_kinematics": has,
        }

    def training_data(self, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
        """Of the last ``n_bins`` decoded bins, those with kinematics: counts (T, N) int32, velocity (T, D) float32."""
        r = self.recent(n_bins)
        has = r["has_kinematics"]
        return r["counts"][has], r["kinematics"][has]

    def stream_tail(self, n_bins: int) -> tuple[int, int | None, np.ndarray]:
        """The current stream's last ``n_bins`` decoded bins: (epoch, last bin or None, counts (T, N))."""
        stop, epoch, first_serial = self._next, self._epoch, self._epoch_first_serial
        r = self.recent(min(n_bins, stop - first_serial))
        keep = r["epoch"] == epoch
        bins = r["bin"][keep]
        return epoch, (int(bins[-1]) if bins.size else None), r["counts"][keep]

    def stream_range(self, epoch: int, first_bin: int, stop_bin: int) -> np.ndarray | None:
        """Counts (stop−first, N) of bins [first, stop) of stream ``epoch``, or None if not all held."""
        if stop_bin <= first_bin:
            return np.zeros((0, self.n_channels), np.int32)
        if epoch != self._epoch:
            return None
        s0 = self._epoch_first_serial + (first_bin - self._epoch_first_bin)
        s1 = s0 + (stop_bin - first_bin)
        if s0 < max(self._epoch_first_serial, self._next - self.capacity) or s1 > self._next:
            return None
        ser, ep, bins, counts, _, _ = self._rows(s0, s1)
        if ser.shape[0] != s1 - s0:
            return None
        return counts

    @property
    def size(self) -> int:
        return min(self._next, self.capacity)
