"""Exact on-the-fly binning on the acquisition clock.  The binner owns the open bin.

Bins
----
Bin ``k`` is the half-open interval ``[k·Δ, (k+1)·Δ)`` of the acquisition clock in integer
nanoseconds (Δ = ``bin_ns``), so an event at time ``t`` belongs to bin ``t // Δ`` — the same
rule on every machine, no floating point.  A *stream* is a run of consecutive bins starting at a
start bin; every bin of a stream is emitted exactly once, in order, even when it is empty.

When a bin closes
-----------------
- **On reported time.**  Bin ``k`` closes as soon as any message reports a time ≥ ``(k+1)·Δ``:
  an event time, a SPIKES/TICK clock, or the end of an upstream-binned COUNTS block.  (An event at
  exactly ``(k+1)·Δ`` belongs to bin ``k+1`` and closes bin ``k``.)
- **On the wall-clock deadline** (unless the stream is free-running).  With ``R`` the highest time
  reported so far and ``w_R`` the wall time it arrived, the open bin ``k`` is due at
  ``w_R + ((k+1)·Δ − R) + stall`` — when it would have closed had the clock kept running — and the
  daemon closes it then with what arrived, flagged ``STALLED``; the next bin is due Δ later.

Late events
-----------
Events (or COUNTS rows) for a bin that has already been emitted are dropped — never merged into a
later bin — and the next emitted bin carries the ``LATE`` flag; the rest of the message applies.
``late_events`` counts the dropped spikes (a late COUNTS row adds its total), ``late_packets`` the
messages that had anything late (once per message, however many bins it touched).

Streams start
-------------
At a RESET with a start time (bin ``start // Δ``), or else at the first time-carrying message
after a reset: the bin of its earliest time.  A message more than ``max_jump_bins`` bins ahead of
the open bin (or spanning more than that, when it starts a stream) is refused (:meth:`jump_ok`) —
a clock that really jumps needs a RESET.

The binner does no I/O and never reads a clock: wall times are passed in, which keeps it exactly
testable.  ``emit(k, counts, n_spikes, flags)`` is called synchronously for every closed bin;
``counts`` is the binner's own (N,) int64 buffer, valid only during the call (copy to keep).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .protocol import PredFlag

Emit = Callable[[int, np.ndarray, int, int], None]

# plain ints: IntFlag arithmetic runs Python code on every bin
_FIRST, _LATE, _STALLED = int(PredFlag.FIRST), int(PredFlag.LATE), int(PredFlag.STALLED)


class Binner:
    """Events / counts / clocks in, closed bins out (through ``emit``), exactly once each, in order."""

    def __init__(self, *, n_channels: int, bin_ns: int, emit: Emit, max_jump_bins: int = 500) -> None:
        if n_channels < 1 or bin_ns < 1 or max_jump_bins < 1:
            raise ValueError("n_channels, bin_ns and max_jump_bins must be ≥ 1")
        self.n_channels = int(n_channels)
        self.bin_ns = int(bin_ns)
        self.max_jump_bins = int(max_jump_bins)
        self._emit = emit
        self._acc = np.zeros(self.n_channels, dtype=np.int64)  # (N,) the open bin
        self._n_open = 0  # spikes in the open bin
        self.k_open: int | None = None  # the open bin; None = no stream
        self.epoch = 0  # stream number (1 for the first stream)
        self.free_run = False
        self.R = -1  # highest reported time in this stream (ns)
        self.anchor_wall_ns = 0  # wall time at which R arrived
        self._flags = 0  # flags for the next emitted bin
        self._next_free_run = False
        # counters (cumulative over streams)
        self.bins_stalled = 0
        self.bins_discarded = 0  # open bins thrown away by a reset
        self.late_events = 0
        self.late_packets = 0
        self.spikes = 0

    # ------------------------------------------------------------------ stream control
    @property
    def started(self) -> bool:
        return self.k_open is not None

    def reset(self, *, start_ns: int | None = None, free_run: bool = False, wall_ns: int = 0) -> None:
        """End the current stream (its open bin is discarded, not emitted).  With ``start_ns`` the next
        stream starts now at bin ``start_ns // Δ``; otherwise at the next time-carrying message.
        Flags raised since the last emitted bin (LATE, GAP, REJECTED) go on the next stream's first bin."""
        if self.k_open is not None:
            self.bins_discarded += 1
        self.k_open = None
        self._acc[:] = 0
        self._n_open = 0
        self._flags &= ~_FIRST  # LATE / GAP / REJECTED still describe what happened since the last bin
        self._next_free_run = bool(free_run)
        if start_ns is not None:
            self._start(start_ns // self.bin_ns, start_ns, wall_ns)

    def _start(self, k: int, t_ns: int, wall_ns: int) -> None:
        self.k_open = int(k)
        self.epoch += 1
        self.free_run = self._next_free_run
        self.R = int(t_ns)
        self.anchor_wall_ns = int(wall_ns)
        self._flags |= _FIRST

    def raise_flags(self, bits: int) -> None:
        """OR ``bits`` into the flags of the next emitted bin."""
        self._flags |= int(bits)

    def jump_ok(self, lo_ns: int, hi_ns: int) -> bool:
        """Whether a message reporting times [lo, hi] stays within ``max_jump_bins`` of the open bin
        (of its own first bin, when no stream is open): no one message closes more bins than that."""
        ref = lo_ns // self.bin_ns if self.k_open is None else self.k_open
        return hi_ns // self.bin_ns - ref <= self.max_jump_bins

    # ------------------------------------------------------------------ input
    def add_events(
        self, channels: np.ndarray, times_ns: np.ndarray, clock_ns: int | None, wall_ns: int
    ) -> None:
        """Events (channel (n,), time (n,) non-decreasing, validated) then an optional clock."""
        n = times_ns.shape[0]
        if self.k_open is None:
            first = int(times_ns[0]) if n else clock_ns
            if first is None:
                return
            self._start(first // self.bin_ns, first, wall_ns)
        if n:
            bin_ns = self.bin_ns
            b0, b1 = int(times_ns[0]) // bin_ns, int(times_ns[-1]) // bin_ns
            if b0 < self.k_open:  # events are sorted: only a packet whose first event is late has late ones
                self.late_packets += 1
            if b0 == b1:
                self._segment(b0, channels)
            else:
                bins = times_ns // bin_ns
                cuts = np.flatnonzero(bins[1:] != bins[:-1]) + 1
                lo = 0
                for hi in cuts.tolist() + [n]:
                    self._segment(int(bins[lo]), channels[lo:hi])
                    lo = hi
            self._report(int(times_ns[-1]), wall_ns)
        if clock_ns is not None:
            self.advance(clock_ns, wall_ns)

    def _segment(self, b: int, channels: np.ndarray) -> None:
        if b < self.k_open:
            self.late_events += channels.shape[0]
            self._flags |= _LATE
            return
        while self.k_open < b:
            self._close(0)
        m = channels.shape[0]
        if m == 1:
            self._acc[int(channels[0])] += 1
        else:
            self._acc += np.bincount(channels, minlength=self.n_channels)
        self._n_open += m

    def add_counts(self, first_bin: int, counts: np.ndarray, wall_ns: int) -> None:
        """Upstream-binned ``counts`` (B, N) for bins ``first_bin …``; closes them all."""
        if self.k_open is None:
            self._start(first_bin, first_bin * self.bin_ns, wall_ns)
        late_rows = 0
        for i in range(counts.shape[0]):
            b = first_bin + i
            if b < self.k_open:
                self.late_events += int(counts[i].sum())
                late_rows += 1
                continue
            while self.k_open < b:
                self._close(0)
            self._acc += counts[i]
            self._n_open += int(counts[i].sum())
        if late_rows:
            self.late_packets += 1
            self._flags |= _LATE
        self.advance((first_bin + counts.shape[0]) * self.bin_ns, wall_ns)

    def advance(self, clock_ns: int, wall_ns: int) -> None:
        """A reported time: close every bin that ends at or before it."""
        if self.k_open is None:
            self._start(clock_ns // self.bin_ns, clock_ns, wall_ns)
        self._report(clock_ns, wall_ns)
        end = (self.k_open + 1) * self.bin_ns
        while end <= clock_ns:
            self._close(0)
            end += self.bin_ns

    def _report(self, t_ns: int, wall_ns: int) -> None:
        if t_ns > self.R:
            self.R = t_ns
            self.anchor_wall_ns = wall_ns

    # ------------------------------------------------------------------ deadline
    def deadline_ns(self, stall_ns: int) -> int | None:
        """Wall time at which the open bin is due (None: no stream, or free-running)."""
        if self.k_open is None or self.free_run:
            return None
        return self.anchor_wall_ns + ((self.k_open + 1) * self.bin_ns - self.R) + stall_ns

    def close_stalled(self) -> None:
        """Close the open bin now with what arrived, flagged STALLED (the deadline passed)."""
        if self.k_open is not None:
            self.bins_stalled += 1
            self._close(_STALLED)

    # ------------------------------------------------------------------ output
    def _close(self, extra_flags: int) -> None:
        k = self.k_open
        flags = self._flags | extra_flags
        self._flags = 0
        n = self._n_open
        self.k_open = k + 1  # advance first: emit may look at the binner
        self.spikes += n
        try:
            self._emit(k, self._acc, n, flags)
        finally:
            self._acc[:] = 0
            self._n_open = 0
