"""LSL adapters against the real liblsl (``pylsl``'s bundled library) and a live daemon: a spike-event
stream and a binned-counts stream decode bit for bit like the native replay of the same counts, the
prediction outlet carries exactly the native predictions, a lost outlet is a counted disconnect and
its return a counted reconnect, and malformed samples are dropped, counted by reason, while the
stream goes on.  Correctness only: timeouts guard liveness, nothing asserts timing."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

try:
    import pylsl
except (ImportError, RuntimeError, OSError) as exc:  # pylsl raises RuntimeError when liblsl cannot be loaded
    pytest.skip(f"pylsl / liblsl unavailable: {exc}", allow_module_level=True)


def _discovery_works() -> bool:
    """Whether LSL can find a stream on this host (its discovery needs UDP multicast or broadcast)."""
    name = f"rpnt-probe-{uuid.uuid4().hex[:8]}"
    outlet = pylsl.StreamOutlet(
        pylsl.StreamInfo(name, "probe", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, name)
    )
    try:
        return bool(pylsl.resolve_byprop("name", name, 1, 10.0))
    finally:
        del outlet


if not _discovery_works():
    pytest.skip(
        "LSL stream discovery does not work on this host (no multicast/broadcast)", allow_module_level=True
    )

from adapter_support import (
    N_CH,
    adapter_stats,
    bridges,
    native_predictions,
    poisson_counts,
    velocities,
    wait_connected,
)
from test_streaming_support import BIN_NS, LIVE_TIMEOUT, FIRDecoder, collect, live_daemon, offline, wait_until

from streaming.adapters import parse_spec
from streaming.adapters.lsl import clock_offset_ns
from streaming.replay import events_from_counts


def _name() -> str:
    return f"rpnt-test-{uuid.uuid4().hex[:10]}"  # LSL resolves by name on the whole host: unique per test


def _base_ns() -> int:
    """A bin boundary a little ahead of this host's LSL clock (a realistic timestamp range)."""
    return (int(pylsl.local_clock() * 1e9) // BIN_NS + 10) * BIN_NS


def spike_samples(counts: np.ndarray, base_ns: int) -> tuple[list[list[int]], list[float]]:
    """The native replay's events as LSL samples: an opening tick, then per bin its events and a tick at its end."""
    chans, times = events_from_counts(counts, BIN_NS)
    ids, ts = [-1], [base_ns]
    for k in range(counts.shape[0]):
        ids += chans[k].tolist() + [-1]
        ts += (base_ns + times[k]).tolist() + [base_ns + (k + 1) * BIN_NS]
    return [[i] for i in ids], [t / 1e9 for t in ts]


def spike_outlet(name: str) -> pylsl.StreamOutlet:
    return pylsl.StreamOutlet(pylsl.StreamInfo(name, "spikes", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, name))


def test_spike_stream_and_outlet_equal_the_native_replay_bit_for_bit():
    counts = poisson_counts(120, seed=1)
    name, out_name = _name(), _name()
    key = f"ingest lsl:{name}?free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        outlet = spike_outlet(name)
        with bridges(d, ingest=[f"lsl:{name}?free_run=1"], publish=[f"lsl:{out_name}"]):
            wait_connected(d, key)
            found = pylsl.resolve_byprop("name", out_name, 1, LIVE_TIMEOUT)
            inlet = pylsl.StreamInlet(found[0])
            inlet.open_stream(timeout=LIVE_TIMEOUT)
            wait_connected(d, f"publish lsl:{out_name}")
            ids, ts = spike_samples(counts, _base_ns())
            outlet.push_chunk(ids, ts)
            got = collect(sub, counts.shape[0])
            rows: list = []
            while len(rows) < counts.shape[0]:
                row, _ = inlet.pull_sample(timeout=LIVE_TIMEOUT)  # (pull_chunk would wait out its timeout)
                assert row is not None, "the prediction outlet stopped short"
                rows.append(row)
            st = adapter_stats(d, key)
    vel_native = velocities(native)
    np.testing.assert_array_equal(velocities(got), vel_native)
    np.testing.assert_array_equal([p.n_spikes for p in got], counts.sum(1))
    assert [p.bin - got[0].bin for p in got] == list(range(counts.shape[0]))
    assert got[0].flags == 8 and not any(p.flags for p in got[1:])  # FIRST, then nothing to report
    # the outlet: [y..., flags, latency_ms, bin] per prediction, the decoded values exactly
    rows = np.asarray(rows[-counts.shape[0] :])
    np.testing.assert_array_equal(rows[:, :2].astype(np.float32), vel_native)
    np.testing.assert_array_equal(rows[:, 4], [p.bin for p in got])
    assert (rows[:, 3] >= 0).all()
    assert (
        st["received"] == len(ids)
        and st["rejected"] == {}
        and st["disconnects"] == 0
        and st["mode"] == "spikes"
    )


def test_counts_stream_equals_the_native_replay_bit_for_bit():
    counts = poisson_counts(80, seed=2)
    name = _name()
    key = f"ingest lsl:{name}?free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        outlet = pylsl.StreamOutlet(
            pylsl.StreamInfo(name, "counts", N_CH, 1e9 / BIN_NS, pylsl.cf_int32, name)
        )
        with bridges(d, ingest=[f"lsl:{name}?free_run=1"]):
            wait_connected(d, key)
            base = _base_ns()
            outlet.push_chunk(counts.tolist(), [(base + k * BIN_NS) / 1e9 for k in range(counts.shape[0])])
            got = collect(sub, counts.shape[0])
            st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(got), velocities(native))
    assert [p.bin - got[0].bin for p in got] == list(range(counts.shape[0]))  # consecutive bins, none twice
    assert st["mode"] == "counts" and st["rejected"] == {} and st["forwarded"] >= 2  # RESET + COUNTS


def test_lost_outlet_is_a_disconnect_and_a_new_one_a_reconnect_that_starts_a_fresh_stream():
    c1, c2 = poisson_counts(30, seed=3), poisson_counts(40, seed=4)
    name = _name()
    key = f"ingest lsl:{name}?free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        outlet = spike_outlet(name)
        with bridges(d, ingest=[f"lsl:{name}?free_run=1"]):
            wait_connected(d, key)
            outlet.push_chunk(*spike_samples(c1, _base_ns()))
            first = collect(sub, c1.shape[0])
            del outlet  # the rig's LSL outlet goes away
            assert wait_until(lambda: adapter_stats(d, key)["disconnects"] == 1)
            outlet = spike_outlet(name)  # and comes back, with a new clock
            assert wait_until(
                lambda: adapter_stats(d, key)["reconnects"] == 1 and adapter_stats(d, key)["connected"]
            )
            outlet.push_chunk(*spike_samples(c2, _base_ns() + 1000 * BIN_NS))
            second = collect(sub, c2.shape[0])
            st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(first), offline(FIRDecoder(), c1))
    np.testing.assert_array_equal(velocities(second), offline(FIRDecoder(), c2))  # fresh state
    assert second[0].epoch == first[0].epoch + 1 and second[0].flags & 8
    assert st["disconnects"] == 1 and st["reconnects"] == 1 and st["connected"]


def test_malformed_samples_are_dropped_and_counted_by_reason_and_the_stream_goes_on():
    counts = poisson_counts(40, seed=5)
    name = _name()
    key = f"ingest lsl:{name}?free_run=1"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        native = native_predictions(rig, sub, counts)
        outlet = spike_outlet(name)
        with bridges(d, ingest=[f"lsl:{name}?free_run=1"]):
            wait_connected(d, key)
            ids, ts = spike_samples(counts, _base_ns())
            at = len(ids) // 2
            bad_ids = [[N_CH], [-5], [70_000], [1]]  # beyond the model's channels, not an id, too large, late
            bad_ts = [ts[at], ts[at], ts[at], ts[at] - 0.5]
            outlet.push_chunk(ids[:at] + bad_ids + ids[at:], ts[:at] + bad_ts + ts[at:])
            got = collect(sub, counts.shape[0])
            st = adapter_stats(d, key)
    np.testing.assert_array_equal(velocities(got), velocities(native))
    assert st["rejected"] == {"channel_range": 3, "time_order": 1} and st["received"] == len(ids) + 4
    assert "channel" in st["last_error"] or "timestamp" in st["last_error"]


def test_a_stream_of_another_shape_is_refused_once_with_a_reason():
    name = _name()
    key = f"ingest lsl:{name}"
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "eeg", 3, 250.0, pylsl.cf_float32, name))  # noqa: F841
        with bridges(d, ingest=[f"lsl:{name}"]):
            assert wait_until(lambda: adapter_stats(d, key)["rejected"].get("stream_format") == 1)
            st = adapter_stats(d, key)
    assert not st["connected"] and "3 numeric channel(s) at 250 Hz" in st["last_error"]


def test_clock_offset_is_whole_bins():
    assert clock_offset_ns(-3.3e-5, BIN_NS) == 0
    assert clock_offset_ns(0.031, BIN_NS) == 2 * BIN_NS and clock_offset_ns(-0.029, BIN_NS) == -BIN_NS
    assert clock_offset_ns(float("nan"), BIN_NS) == 0
    assert parse_spec("lsl:rig?free_run=1", direction="ingest").options == {"free_run": "1"}
