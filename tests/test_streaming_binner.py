"""The pure parts of the hot path, without sockets: binner (exact binning, clocks, late events,
deadlines), per-source sequence accounting, the history ring, latency histograms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.binner import Binner
from streaming.history import HistoryRing
from streaming.latency import Histogram, bucket_bounds, bucket_of, percentiles_ms
from streaming.protocol import PredFlag
from streaming.replay import bin_events, events_from_counts
from streaming.sources import DUPLICATE, SourceTable

D = 1000  # bin width (ns) for the pure tests


class Sink:
    def __init__(self):
        self.bins, self.counts, self.spikes, self.flags = [], [], [], []

    def __call__(self, k, counts, n, flags):
        self.bins.append(k)
        self.counts.append(counts.copy())
        self.spikes.append(n)
        self.flags.append(flags)


def make(n=4, **kw):
    sink = Sink()
    return Binner(n_channels=n, bin_ns=D, emit=sink, **kw), sink


# ---------------------------------------------------------------------------- binner
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_events_in_any_packetisation_rebuild_the_counts_exactly(data):
    T = data.draw(st.integers(1, 30))
    N = data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    counts = rng.poisson(rng.uniform(0, 3), size=(T, N))
    # random event times anywhere inside their bins (not only the replay's midpoints)
    ch = np.repeat(np.tile(np.arange(N), T), counts.reshape(-1))
    b = np.repeat(np.repeat(np.arange(T), N), counts.reshape(-1))
    tm = b * D + rng.integers(0, D, size=b.size)
    order = np.argsort(tm, kind="stable")
    ch, tm = ch[order].astype(np.uint16), tm[order].astype(np.int64)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, max(0, ch.size)), max_size=12))))
    binner, sink = make(N)
    binner.reset(start_ns=0, wall_ns=0)
    lo = 0
    for hi in cuts + [ch.size]:
        binner.add_events(ch[lo:hi], tm[lo:hi], None, 0)
        lo = hi
    binner.advance(T * D, 0)  # the final clock closes the last bin
    assert sink.bins == list(range(T))
    np.testing.assert_array_equal(np.stack(sink.counts), counts)
    assert sink.spikes == counts.sum(1).tolist()
    assert sink.flags[0] == PredFlag.FIRST and not any(sink.flags[1:])
    assert binner.late_events == 0


def test_clock_closes_empty_bins_and_boundary_event_belongs_to_the_next_bin():
    binner, sink = make()
    binner.reset(start_ns=0, wall_ns=0)
    binner.add_events(
        np.array([1], np.uint16), np.array([D], np.int64), None, 0
    )  # exactly at the end of bin 0
    assert sink.bins == [0] and sink.counts[0].sum() == 0
    binner.advance(4 * D - 1, 0)
    assert sink.bins == [0, 1, 2]  # bin 3 still open: the clock has not reached its end
    assert sink.counts[1][1] == 1  # the boundary event is in bin 1
    binner.advance(4 * D, 0)
    assert sink.bins == [0, 1, 2, 3]


def test_late_events_are_counted_and_flagged_never_merged():
    binner, sink = make()
    binner.reset(start_ns=0, wall_ns=0)
    binner.add_events(np.array([0, 1], np.uint16), np.array([10, 20], np.int64), 2 * D, 0)  # closes bins 0, 1
    binner.add_events(np.array([2, 3, 3], np.uint16), np.array([30, D + 5, 2 * D + 1], np.int64), None, 0)
    assert binner.late_events == 2 and binner.late_packets == 1  # two late bins, one message
    binner.advance(3 * D, 0)
    assert sink.bins == [0, 1, 2]
    np.testing.assert_array_equal(sink.counts[2], [0, 0, 0, 1])  # only the on-time event
    assert sink.flags[2] & PredFlag.LATE


def test_late_packets_count_messages_for_events_and_counts_alike():
    binner, sink = make(2)
    binner.reset(start_ns=0, wall_ns=0)
    binner.advance(3 * D, 0)  # bins 0..2 decoded
    binner.add_events(np.array([0], np.uint16), np.array([3 * D], np.int64), None, 0)  # on time: not late
    assert binner.late_packets == 0
    binner.add_counts(
        0, np.array([[1, 2], [0, 0], [4, 0], [5, 5]], np.uint16), 0
    )  # rows 0..2 late, row 3 on time
    assert binner.late_packets == 1 and binner.late_events == 7  # one message; the late rows' spikes
    binner.add_counts(1, np.zeros((1, 2), np.uint16), 0)  # an all-zero late row is still a late message
    assert binner.late_packets == 2 and binner.late_events == 7
    binner.advance(4 * D, 0)
    np.testing.assert_array_equal(sink.counts[3], [6, 5])  # the on-time row merged with the event
    assert sink.flags[3] & PredFlag.LATE


def test_stream_starts_at_the_first_time_without_reset():
    binner, sink = make()
    binner.add_events(np.array([2], np.uint16), np.array([5 * D + 7], np.int64), None, 0)
    assert binner.k_open == 5 and binner.epoch == 1
    binner.advance(7 * D, 0)
    assert sink.bins == [5, 6] and sink.flags[0] & PredFlag.FIRST
    binner.reset(wall_ns=0)  # open bin 7 discarded; the next stream starts at the next time
    assert binner.bins_discarded == 1
    binner.advance(20 * D + 3, 0)
    assert binner.k_open == 20 and binner.epoch == 2
    assert sink.bins == [5, 6]


def test_stall_deadline_follows_the_reported_clock():
    binner, sink = make()
    binner.reset(start_ns=0, wall_ns=1_000_000)
    stall = 300
    assert binner.deadline_ns(stall) == 1_000_000 + D + stall  # bin 0 due one bin after the start
    binner.add_events(np.array([0], np.uint16), np.array([400], np.int64), None, 1_000_500)
    assert binner.deadline_ns(stall) == 1_000_500 + (D - 400) + stall
    binner.close_stalled()
    binner.close_stalled()
    assert sink.bins == [0, 1] and all(f & PredFlag.STALLED for f in sink.flags)
    assert sink.counts[0][0] == 1  # closed with what arrived
    assert binner.deadline_ns(stall) == 1_000_500 + (3 * D - 400) + stall  # one Δ per bin
    binner.add_events(np.array([1], np.uint16), np.array([D + 10], np.int64), None, 1_002_000)  # late now
    assert binner.late_events == 1
    binner.reset(start_ns=0, free_run=True, wall_ns=0)
    assert binner.deadline_ns(stall) is None


def test_upstream_counts_merge_with_events_and_close_their_bins():
    binner, sink = make(3)
    binner.reset(start_ns=0, wall_ns=0)
    binner.add_events(np.array([0], np.uint16), np.array([D + 1], np.int64), None, 0)
    binner.add_counts(1, np.array([[1, 2, 3], [0, 0, 7]], np.uint16), 0)
    assert sink.bins == [0, 1, 2]
    np.testing.assert_array_equal(sink.counts[1], [2, 2, 3])
    np.testing.assert_array_equal(sink.counts[2], [0, 0, 7])
    binner.add_counts(2, np.array([[5, 5, 5], [1, 1, 1]], np.uint16), 0)  # bin 2 is late, bin 3 on time
    assert binner.late_events == 15
    np.testing.assert_array_equal(sink.counts[3], [1, 1, 1])


def test_a_reset_keeps_the_pending_flags_for_the_next_streams_first_bin():
    binner, sink = make()
    binner.reset(start_ns=0, wall_ns=0)
    binner.raise_flags(PredFlag.REJECTED | PredFlag.GAP)  # e.g. a rejected message, a lost one
    binner.reset(start_ns=10 * D, wall_ns=0)  # bin 0 discarded, never emitted
    binner.advance(12 * D, 0)
    assert sink.bins == [10, 11]
    assert sink.flags == [PredFlag.FIRST | PredFlag.REJECTED | PredFlag.GAP, 0]


def test_jump_guard():
    binner, _ = make(max_jump_bins=10)
    assert binner.jump_ok(10**15, 10**15 + 10 * D)  # no stream yet: anything starts one ...
    assert not binner.jump_ok(10**15, 10**15 + 11 * D)  # ... but no message spans more than the limit
    binner.reset(start_ns=0, wall_ns=0)
    assert binner.jump_ok(0, 10 * D + D - 1) and not binner.jump_ok(5 * D, 11 * D)


def test_emit_exception_does_not_corrupt_the_binner():
    calls = []

    def emit(k, counts, n, flags):
        calls.append(k)
        if k == 1:
            raise RuntimeError("consumer failed")

    b = Binner(n_channels=2, bin_ns=D, emit=emit)
    b.reset(start_ns=0, wall_ns=0)
    with pytest.raises(RuntimeError):
        b.advance(3 * D, 0)
    b.advance(3 * D, 0)
    assert calls == [0, 1, 2] and b.k_open == 3


# ---------------------------------------------------------------------------- sources
@given(data=st.data())
@settings(max_examples=100, deadline=None)
def test_sequence_balance_is_exact(data):
    n = data.draw(st.integers(1, 300))
    first = data.draw(st.integers(0, 10**6))
    dropped = data.draw(st.sets(st.integers(1, max(1, n - 2)), max_size=n)) if n > 2 else set()
    kept = [first + i for i in range(n) if i not in dropped]
    tab = SourceTable()
    gaps = sum(tab.observe(5, s) for s in kept)
    s = tab.summary()["per_source"]["5"]
    assert gaps == s["missing"] == n - len(kept)
    assert s["received"] == len(kept) and s["sent"] == n


def test_duplicates_restarts_and_bounded_table():
    tab = SourceTable(max_sources=3)
    assert tab.observe(1, 10) == 0 and tab.observe(1, 11) == 0
    assert tab.observe(1, 11) == DUPLICATE and tab.observe(1, 3) == DUPLICATE
    tab.report_time(1, 500)
    assert tab.observe(1, 0) == 0 and tab.restarts == 1 and tab.time_of(1) == -1
    for src in range(100, 200):
        tab.observe(src, 0)
    assert len(tab) == 3 and tab.evicted == 98


# ---------------------------------------------------------------------------- history
def test_history_ring_kinematics_before_and_after_their_bins_and_wraparound():
    h = HistoryRing(capacity=5, n_channels=2, n_kinematics=1, max_pending=3)
    h.add_kinematics(1, 0, np.array([[10.0]], np.float32))  # before the stream's first bin
    for k in range(4):
        h.append(1, k, np.array([k, k + 1]))
    h.add_kinematics(
        1, 2, np.array([[12.0], [13.0], [14.0]], np.float32)
    )  # bins 2, 3 (present) and 4 (pending)
    h.append(1, 4, np.array([4, 5]))
    counts, vel = h.training_data(100)
    np.testing.assert_array_equal(counts[:, 0], [0, 2, 3, 4])
    np.testing.assert_array_equal(vel[:, 0], [10, 12, 13, 14])
    for k in range(5, 9):  # wrap: bins 0..3 leave the ring
        h.append(1, k, np.array([k, k]))
    counts, vel = h.training_data(100)
    np.testing.assert_array_equal(counts[:, 0], [4])
    h.add_kinematics(1, 0, np.array([[1.0]], np.float32))
    assert h.kinematics_stale == 1
    assert h.stream_range(1, 6, 9)[:, 0].tolist() == [6, 7, 8]
    assert h.stream_range(1, 2, 9) is None  # bin 2 left the ring
    for k in range(100, 110):  # far-ahead kinematics: the pending map stays bounded
        h.add_kinematics(1, k, np.array([[0.0]], np.float32))
    assert h.kinematics_dropped == 7
    h.append(2, 0, np.array([0, 0]))  # a new stream: pending kinematics of the old one are gone
    assert h.stream_tail(10)[:2] == (2, 0)


def test_history_read_skips_rows_overwritten_during_the_read():
    h = HistoryRing(capacity=2000, n_channels=1, n_kinematics=1)
    for k in range(2000):
        h.append(1, k, np.array([k]))
    r = h.recent(5000)
    assert r["bin"].tolist() == list(range(2000))
    h._serials[10] = 999_999  # as if the row had been overwritten meanwhile
    r = h.recent(5000)
    assert 10 not in r["bin"].tolist() and len(r["bin"]) == 1999


# ---------------------------------------------------------------------------- latency
def test_histogram_buckets_partition_and_quantiles_are_within_3_percent():
    for v in [0, 1, 63, 64, 65, 127, 128, 1000, 12345, 10**9, 2**39 + 5]:
        lo, hi = bucket_bounds(bucket_of(v))
        assert lo <= v < hi and (hi - lo) <= max(1, lo / 32)
    rng = np.random.default_rng(0)
    vals = (rng.lognormal(12, 1.0, 20_000)).astype(np.int64)
    h = Histogram()
    for v in vals.tolist():
        h.record(v)
    s = h.summary()
    exact = percentiles_ms(vals)
    for q in ("p50_ms", "p99_ms", "p99.9_ms"):
        assert exact[q] <= s[q] <= exact[q] * 1.0313 + 1e-9, q
    assert s["max_ms"] == exact["max_ms"] and s["count"] == 20_000
    cum = h.cumulative([0.1, 1.0, 1e9])
    assert cum[-1][1] == 20_000 and cum[0][1] <= cum[1][1]


# ---------------------------------------------------------------------------- replay placement rule
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_replay_events_rebuild_counts_exactly(data):
    T, N = data.draw(st.integers(1, 20)), data.draw(st.integers(1, 7))
    bin_ns = data.draw(st.sampled_from([1, 7, 1000, 20_000_000, 50_000_000]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    counts = rng.poisson(rng.uniform(0, 4), (T, N))
    counts[rng.random((T, N)) < 0.05] = rng.integers(0, 60)  # some dense bins
    first = data.draw(st.integers(0, 10**6))
    chans, times = events_from_counts(counts, bin_ns, first_bin=first)
    for k in range(T):
        assert (np.diff(times[k]) >= 0).all()
        if times[k].size:
            assert times[k].min() >= (first + k) * bin_ns and times[k].max() < (first + k + 1) * bin_ns
    got = bin_events(
        np.concatenate(chans), np.concatenate(times), bin_ns=bin_ns, n_channels=N, first_bin=first, n_bins=T
    )
    np.testing.assert_array_equal(got, counts)
    again = events_from_counts(counts, bin_ns, first_bin=first)
    assert all((a == b).all() for a, b in zip(again[1], times, strict=True))  # deterministic
