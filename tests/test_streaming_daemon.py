"""The live daemon over real ZeroMQ sockets on loopback (ipc:// in a temp dir, or tcp://127.0.0.1
with OS-picked ports), with a numpy decoder.  Correctness only: no timing assertions; timeouts are
generous and only guard liveness."""

from __future__ import annotations

import gc
import threading
import tracemalloc

import numpy as np
import pytest
import zmq
from test_streaming_support import (
    BIN_NS,
    LIVE_TIMEOUT,
    FIRDecoder,
    barrier,
    collect,
    live_daemon,
    offline,
    send_stream,
    short_ipc_dir,
    wait_until,
)

from streaming.client import PredictionSubscriber, RigClient
from streaming.daemon import Daemon
from streaming.options import DaemonOptions, check_endpoint, max_jump_bins
from streaming.protocol import INGEST_HEADER, MAGIC, MsgType, Pong, PredFlag, encode_spikes
from streaming.replay import events_from_counts

RNG = np.random.default_rng(11)


def poisson(T, N=8, lam=1.5, seed=None):
    rng = np.random.default_rng(seed) if seed is not None else RNG
    return rng.poisson(lam, (T, N))


def by_bin(preds):
    return {p.bin: p for p in preds}


def test_stream_decodes_exactly_like_offline_over_tcp():
    counts = poisson(300, seed=1)
    with live_daemon(FIRDecoder(), transport="tcp") as (d, rig, sub):
        send_stream(rig, counts)
        preds = collect(sub, 300)
        st = d.status()
    assert [p.bin for p in preds] == list(range(300))  # every bin once, in order
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))
    assert [p.n_spikes for p in preds] == counts.sum(1).tolist()  # the daemon rebuilt the counts
    assert preds[0].flags == PredFlag.FIRST and not any(p.flags for p in preds[1:])
    assert all(p.bin_start_ns == p.bin * BIN_NS and p.bin_end_ns == (p.bin + 1) * BIN_NS for p in preds)
    assert {p.model_version for p in preds} == {"fir-a"} and {p.epoch for p in preds} == {1}
    assert all(p.t_recv_ns <= p.t_close_ns <= p.t_infer_ns <= p.t_publish_ns for p in preds)
    assert st["bins_decoded"] == 300 and st["model_version"] == "fir-a" and st["n_channels"] == 8
    assert st["fingerprint"] == "fp-fir-a" and st["bin_s"] == 0.02 and st["uptime_s"] > 0


def test_counts_messages_ticks_and_sample_clock_sources():
    """Upstream-binned counts, events on a 30 kHz sample clock and ticks all land in the same bins."""
    counts = poisson(60, seed=2)
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        rig.send_counts(0, counts[:20])  # bins 0..19, binned upstream
        preds = barrier(rig, sub)  # two sockets: order across them is only what we enforce
        ticks = RigClient(endpoint=d.endpoints["ingest"], source_id=2, rate_hz=30_000)
        chans, times = events_from_counts(counts[20:40], BIN_NS, first_bin=20)
        for k in range(20):  # ns → samples at 30 kHz: a bin is exactly 600 samples
            ticks.send_spikes(chans[k], times[k] * 30_000 // 10**9)
            ticks.send_tick((21 + k) * 600)
        preds += barrier(ticks, sub)
        rig.send_counts(40 * BIN_NS, counts[40:], time_is_clock=True, bin_ns=BIN_NS)
        preds += collect(sub, 20)
        ticks.close()
    assert [p.bin for p in preds] == list(range(60))
    assert [p.n_spikes for p in preds] == counts.sum(1).tolist()
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))


def test_fastest_source_closes_bins_and_the_slow_ones_events_are_late_not_merged():
    counts = poisson(10, seed=3)
    with live_daemon(FIRDecoder()) as (d, fast, sub):
        slow = RigClient(endpoint=d.endpoints["ingest"], source_id=9)
        fast.send_reset(start=0, free_run=True)
        barrier(fast, sub)
        chans, times = events_from_counts(counts, BIN_NS)
        for k in range(5):
            fast.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        preds = barrier(fast, sub)  # bins 0..4 decoded
        slow.send_spikes(
            [0, 1, 2], [BIN_NS + 5, 3 * BIN_NS, 5 * BIN_NS + 1]
        )  # two late, one for the open bin 5
        preds += barrier(slow, sub)
        for k in range(5, 10):
            fast.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        preds += collect(sub, 5)
        snap = d.snapshot()
        slow.close()
    assert [p.bin for p in preds] == list(range(10))
    assert snap["counters"]["late_events"] == 2 and snap["counters"]["late_packets"] == 1  # one slow message
    expect = counts.copy()
    expect[5, 2] += 1  # the on-time event of the slow source
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), expect))
    assert preds[5].flags & PredFlag.LATE and not preds[4].flags & PredFlag.LATE


def test_sequence_gaps_are_counted_exactly_and_duplicates_rejected():
    counts = poisson(20, seed=4)
    with live_daemon(FIRDecoder(), source_id=3) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        chans, times = events_from_counts(counts, BIN_NS)
        lost = {4, 5, 6, 11}
        for k in range(20):
            frames = encode_spikes(
                source=3, seq=rig.seq, channels=chans[k], times=times[k], clock=(k + 1) * BIN_NS
            )
            rig.seq += 1
            if k not in lost:
                rig.send_frames(frames)
        rig.send_frames(frames)  # a duplicate of the last one
        preds = collect(sub, 20)
        barrier(rig, sub)
        snap = d.snapshot()
    seq = snap["sequence"]["per_source"]["3"]
    assert seq["missing"] == 4 and seq["sent"] == seq["received"] + seq["missing"]
    assert snap["counters"]["gaps"] == 4 and snap["rejected"] == {"duplicate": 1}
    by = by_bin(preds)
    # the first bin closed after the gap was seen carries GAP: exactly the bins whose packets were lost
    assert [k for k, p in sorted(by.items()) if p.flags & PredFlag.GAP] == [4, 11]
    # the lost bins' packets never came: those bins closed empty when the next packet reported its time
    assert by[4].n_spikes == 0 and by[11].n_spikes == 0


def test_stalled_source_deadline_closes_bins_and_flags_them():
    counts = poisson(5, seed=5)
    with live_daemon(FIRDecoder(), stall_timeout_s=0.25) as (d, rig, sub):
        send_stream(rig, counts, free_run=False)  # a real-time stream: the deadline applies
        preds = collect(sub, 5)
        stalled = collect(sub, 3, where=lambda p: p.bin >= 5)  # nothing more is sent: deadlines fire
        rig.send_spikes([1], [5 * BIN_NS + 3], clock=9 * BIN_NS)  # arrives after bin 5 was closed
        barrier(rig, sub)
        snap = d.snapshot()
        rig.send_reset()  # end the stream (no more stalled bins)
    assert [p.bin for p in preds] == list(range(5)) and not any(p.flags & PredFlag.STALLED for p in preds)
    assert [p.bin for p in stalled] == [5, 6, 7]
    assert all(p.flags & PredFlag.STALLED and p.n_spikes == 0 for p in stalled)
    assert snap["counters"]["bins_stalled"] >= 3 and snap["counters"]["late_events"] == 1


def test_a_slow_or_absent_subscriber_never_blocks_the_loop():
    counts = poisson(3000, N=8, lam=0.5, seed=6)
    with live_daemon(FIRDecoder(), publish_hwm=50) as (d, rig, sub):
        ctx = zmq.Context.instance()
        stuck = ctx.socket(zmq.SUB)  # subscribes, never reads
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(d.endpoints["publish"])
        barrier(rig, sub)
        send_stream(rig, counts)
        assert wait_until(lambda: d.snapshot()["counters"]["bins"] >= 3000)
        snap = d.snapshot()
        stuck.close(0)
    assert snap["counters"]["bins"] == 3000
    assert snap["latency_ms"]["daemon"]["count"] == 3000


def test_swap_decoder_takes_effect_exactly_at_a_bin_boundary_warm_and_fresh():
    counts = poisson(200, seed=7)
    a, b, c = (
        FIRDecoder(seed=0, version="A"),
        FIRDecoder(seed=1, version="B", taps=4),
        FIRDecoder(seed=2, version="C"),
    )
    with live_daemon(a) as (d, rig, sub):
        send_stream(rig, counts[:80])
        first = collect(sub, 80)
        ticket = d.swap_decoder(b)  # warm: B runs over the history here, in this thread
        assert not ticket.done()
        chans, times = events_from_counts(counts, BIN_NS)
        for k in range(80, 140):
            rig.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        second = collect(sub, 60)
        assert ticket.wait(30) == 80 and ticket.mode.startswith("warm")
        barrier(rig, sub)
        ticket2 = d.swap_decoder(c, warm=False)
        for k in range(140, 200):
            rig.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        third = collect(sub, 60)
        assert ticket2.wait(30) == 140 and ticket2.mode == "fresh"
        st = d.status()
    preds = first + second + third
    assert [p.bin for p in preds] == list(range(200))  # no bin missed or decoded twice
    vel = np.stack([p.velocity for p in preds])
    np.testing.assert_array_equal(vel[:80], offline(FIRDecoder(seed=0), counts[:80]))
    # warm: exactly what B would have said had it been running from the start of the stream
    np.testing.assert_array_equal(vel[80:140], offline(FIRDecoder(seed=1, taps=4), counts[:140])[80:])
    # fresh: C starts from an empty state at bin 140
    np.testing.assert_array_equal(vel[140:], offline(FIRDecoder(seed=2), counts[140:]))
    versions = [p.model_version for p in preds]
    assert versions == ["A"] * 80 + ["B"] * 60 + ["C"] * 60
    assert [p.generation for p in (preds[79], preds[80], preds[140])] == [1, 2, 3]
    assert [i for i, p in enumerate(preds) if p.flags & PredFlag.SWAPPED] == [80, 140]
    assert [s["bin"] for s in st["swaps"]] == [80, 140] and st["model_version"] == "C"


def test_swap_rejects_a_decoder_for_other_channels():
    with live_daemon(FIRDecoder()) as (d, rig, sub), pytest.raises(ValueError, match="channels"):
        d.swap_decoder(FIRDecoder(n_channels=9))


def test_kinematics_ring_gives_recent_training_data():
    counts = poisson(100, seed=8)
    vel = np.random.default_rng(8).standard_normal((100, 2)).astype(np.float32)
    with live_daemon(FIRDecoder(), history_s=1.0) as (d, rig, sub):  # 50 bins of history
        rig.send_reset(start=0, free_run=True)
        rig.send_kinematics(0, vel[0:3])  # early: before their bins close
        chans, times = events_from_counts(counts, BIN_NS)
        for k in range(100):
            rig.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
            if k >= 3 and k % 2 == 1:
                rig.send_kinematics(k, vel[k])  # right after its bin
        rig.send_kinematics(60, vel[60])  # later, for a bin still in the ring
        barrier(rig, sub)
        x_all, y_all = d.recent_training_data(1000.0)
        x_10, y_10 = d.recent_training_data(0.2)  # the last 10 bins
        rig.send_kinematics(0, vel[0, :1])  # wrong width: the daemon rejects it (dims)
        barrier(rig, sub)
        snap = d.snapshot()
    have = [k for k in range(50, 100) if k % 2 == 1 or k == 60]
    np.testing.assert_array_equal(x_all, counts[have])
    np.testing.assert_array_equal(y_all, vel[have])
    np.testing.assert_array_equal(x_10, counts[[k for k in range(90, 100) if k % 2 == 1]])
    assert snap["rejected"].get("dims") == 1


def test_reset_starts_a_fresh_stream_from_message_and_from_the_control_plane():
    counts = poisson(40, seed=9)
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        send_stream(rig, counts[:20])
        p1 = collect(sub, 20)
        send_stream(rig, counts[20:], first_bin=1000)  # RESET message: new stream at bin 1000
        p2 = collect(sub, 20)
        d.reset(start_ns=5000 * BIN_NS, free_run=True)
        assert wait_until(lambda: d.snapshot()["stream"]["epoch"] == 3)
        send_stream(rig, counts[:5], first_bin=5000, reset=False)
        p3 = collect(sub, 5)
    assert [p.epoch for p in p1 + p2 + p3] == [1] * 20 + [2] * 20 + [3] * 5
    assert [p.bin for p in p2] == list(range(1000, 1020))
    np.testing.assert_array_equal(np.stack([p.velocity for p in p2]), offline(FIRDecoder(), counts[20:]))
    np.testing.assert_array_equal(np.stack([p.velocity for p in p3]), offline(FIRDecoder(), counts[:5]))
    assert p2[0].flags & PredFlag.FIRST and p3[0].flags & PredFlag.FIRST


def test_a_failing_decoder_yields_flagged_nan_predictions_and_the_stream_goes_on():
    counts = poisson(10, seed=10)
    dec = FIRDecoder(fail_on={4})
    with live_daemon(dec, warmup_bins=0) as (d, rig, sub):
        send_stream(rig, counts)
        preds = collect(sub, 10)
        snap = d.snapshot()
    assert [p.bin for p in preds] == list(range(10))
    assert preds[3].flags & PredFlag.ERROR and np.isnan(preds[3].velocity).all()
    assert not np.isnan(np.stack([p.velocity for i, p in enumerate(preds) if i != 3])).any()
    assert snap["counters"]["decode_errors"] == 1


def test_bad_semantic_input_is_rejected_with_reasons_and_decoding_continues():
    counts = poisson(30, seed=12)
    with live_daemon(FIRDecoder(), max_jump_s=1.0) as (d, rig, sub):
        send_stream(rig, counts[:10])
        rig.send_spikes([8], [10 * BIN_NS + 1])  # channel 8 of 8
        rig.send_counts(10, np.ones((1, 7), np.uint16))  # 7 channels for an 8-channel model
        rig.send_counts(10, np.ones((1, 8), np.uint16), bin_ns=50_000_000)  # binned at another width
        rig.send_spikes([0], [100 * BIN_NS])  # 2 s ahead of the open bin
        rig.send_tick(5 * BIN_NS)  # this source already reported 10 bins
        chans, times = events_from_counts(counts, BIN_NS)
        for k in range(10, 30):
            rig.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        preds = collect(sub, 30)[10:]
        snap = d.snapshot()
    assert snap["rejected"] == {
        "channel_range": 1,
        "channel_count": 1,
        "bin_width": 1,
        "time_jump": 1,
        "time_regression": 1,
    }
    assert preds[0].bin == 10 and preds[0].flags & PredFlag.REJECTED
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts)[10:])


def test_memory_and_state_stay_bounded_over_a_long_stream():
    dec = FIRDecoder()
    with live_daemon(dec, max_sources=8, history_s=2.0, max_pending_kinematics=16) as (d, rig, sub):
        counts = poisson(1000, lam=0.8, seed=13)
        chans, times = events_from_counts(counts, BIN_NS)

        def run(offset):
            for k in range(1000):
                b = offset + k
                rig.send_spikes(chans[k], times[k] + offset * BIN_NS, clock=(b + 1) * BIN_NS)
                rig.send_kinematics(b + 5, np.zeros(2, np.float32))
            barrier(rig, sub)

        rig.send_reset(start=0, free_run=True)
        run(0)  # warm everything up
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1, 3):
            run(1000 * i)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        print(f"traced growth over 2000 bins: {grown} bytes")
        tracemalloc.stop()
        snap = d.snapshot()
    assert snap["counters"]["bins"] == 3000
    assert grown < 256 * 1024, f"loop state grew by {grown} bytes over 2000 bins"
    assert len(d.history._pending) <= 16 and d.history.size == 100


def test_construction_guards():
    with pytest.raises(ValueError, match="loopback"):
        check_endpoint("tcp://0.0.0.0:5555")
    assert check_endpoint("tcp://0.0.0.0:5555", allow_remote=True)
    assert check_endpoint("ipc:///tmp/x") and check_endpoint("tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="trained at 50 ms"):
        Daemon(decoder=FIRDecoder(bin_s=0.05), bin_s=0.02, ingest="ipc:///tmp/a", publish="ipc:///tmp/b")
    Daemon(
        decoder=FIRDecoder(bin_s=0.05),
        bin_s=0.02,
        ingest="ipc:///tmp/a",
        publish="ipc:///tmp/b",
        options=DaemonOptions(allow_bin_mismatch=True),
    )
    with pytest.raises(ValueError, match="bin_s"):
        Daemon(decoder=FIRDecoder(), bin_s=-1.0)


def test_bind_failure_is_reported_by_start_and_threads_exit():
    tmp = short_ipc_dir()
    d1 = Daemon(decoder=FIRDecoder(), ingest="tcp://127.0.0.1:*", publish=f"ipc://{tmp}/p").start()
    port_ep = d1.endpoints["ingest"]
    d2 = Daemon(decoder=FIRDecoder(), ingest=port_ep, publish=f"ipc://{tmp}/q")
    with pytest.raises(RuntimeError, match="failed to start"):
        d2.start()
    d1.stop()
    assert d1.join(30) and d2.join(30)
    assert not any(t.name == "rpnt-decode" for t in threading.enumerate())


def test_startup_habits_are_applied_and_reported():
    opts = dict(affinity=(0,), gc_freeze=True, rt_priority=None, warmup_bins=4)
    try:
        with live_daemon(FIRDecoder(), **opts) as (d, rig, sub):
            rep = d.status()["startup"]
    finally:
        gc.unfreeze()
    assert rep["affinity"]["requested"] == [0] and "applied" in rep["affinity"]
    assert rep["gc_freeze"]["applied"] is True
    assert rep["warmup"]["requested"] == 4 and rep["warmup"]["applied"]
    assert rep["rt_priority"]["applied"] is False
    assert rep["endpoints"]["ingest"].startswith("ipc://")


def test_subscriber_reading_the_prediction_stream_only():
    counts = poisson(5, seed=14)
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        only = PredictionSubscriber(endpoint=d.endpoints["publish"], predictions_only=True)
        rig.send_reset(start=0, free_run=True)
        k = 0
        while only.recv(0.05) is None and k < 1000:  # until its subscription is live (slow joiner)
            k += 1
            rig.send_tick(k * BIN_NS)
        rig.ping(7)
        send_stream(rig, counts, first_bin=1000)
        got = collect(only, 5, where=lambda p: p.bin >= 1000)
        rest = []
        while (m := only.recv(0.2)) is not None:
            rest.append(m)
        only.close()
    assert [p.bin for p in got] == list(range(1000, 1005))
    assert all(isinstance(m, type(got[0])) for m in rest)  # no PONG on a predictions-only subscription


def test_reject_floods_are_logged_rate_limited(caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="rpnt.streaming")
    with live_daemon(FIRDecoder(), log_interval_s=3600.0) as (d, rig, sub):
        for _ in range(300):
            rig.send_frames([b"not a header"])
        barrier(rig, sub)
        assert wait_until(lambda: any("header_size" in r.getMessage() for r in caplog.records))
        snap = d.snapshot()
    lines = [r for r in caplog.records if "header_size" in r.getMessage()]
    assert snap["rejected"] == {"header_size": 300}
    assert len(lines) == 1  # one line per reason per interval; the other 299 are only counted


def test_control_plane_readers_in_other_threads_do_not_disturb_the_stream():
    counts = poisson(400, seed=15)
    stop = threading.Event()
    seen = []

    def reader(d):
        while not stop.is_set():
            seen.append((d.snapshot()["counters"]["bins"], d.status()["bins_decoded"]))
            d.recent_training_data(10.0)

    with live_daemon(FIRDecoder()) as (d, rig, sub):
        threads = [threading.Thread(target=reader, args=(d,)) for _ in range(2)]
        for t in threads:
            t.start()
        send_stream(rig, counts)
        preds = collect(sub, 400)
        stop.set()
        for t in threads:
            t.join(30)
    assert [p.bin for p in preds] == list(range(400))
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))
    assert len(seen) > 0 and all(a >= 0 and b >= 0 for a, b in seen)


# ---------------------------------------------------------------------------- sequence accounting of rejects
def _raw(rig, msg_type, *frames, version=1, flags=0, time=0, n=0, m=0, aux=0, seq=None):
    """A hand-built message of ``rig``'s source with its next seq (or ``seq``)."""
    if seq is None:
        seq = rig.seq
        rig.seq += 1
    return [
        INGEST_HEADER.pack(MAGIC, version, msg_type, rig.source_id, flags, seq, time, 0, n, m, aux),
        *frames,
    ]


def _pong_status(rig, sub, token):
    """PING; the status of the PONG that answers it (everything sent before has been handled)."""
    rig.ping(token)
    while True:
        m = sub.recv(LIVE_TIMEOUT)
        assert m is not None, "no PONG"
        if isinstance(m, Pong) and m.token == token:
            return m.status


def test_a_rejected_message_consumes_its_seq_and_is_not_counted_as_lost():
    """good COUNTS, TICK at time −5 (time_range), good COUNTS: REJECTED, not GAP; nothing missing."""
    ones = np.ones((1, 8), np.uint16)
    with live_daemon(FIRDecoder(), source_id=5) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        rig.send_counts(0, ones)
        rig.send_frames(_raw(rig, MsgType.TICK, time=-5))
        rig.send_counts(1, ones)
        preds = collect(sub, 2)
        barrier(rig, sub)
        snap, n_sent = d.snapshot(), rig.seq
        rig.seq += 1  # a message really lost: the rejected message that follows still reveals it
        rig.send_frames(_raw(rig, MsgType.TICK, time=-5))
        rig.send_counts(2, ones)
        preds += collect(sub, 1)
        barrier(rig, sub)
        after = d.snapshot()
    assert [p.bin for p in preds] == [0, 1, 2]
    assert preds[1].flags == PredFlag.REJECTED  # not GAP: nothing was lost
    seq = snap["sequence"]["per_source"]["5"]
    assert seq["missing"] == 0 and seq["received"] == seq["sent"] == n_sent and seq["rejected"] == 1
    assert snap["counters"]["gaps"] == 0 and snap["rejected"] == {"time_range": 1}
    assert preds[2].flags == PredFlag.GAP | PredFlag.REJECTED
    seq = after["sequence"]["per_source"]["5"]
    assert seq["missing"] == 1 and seq["sent"] == rig.seq and seq["rejected"] == 2


def test_every_reject_after_a_readable_header_consumes_its_seq():
    ch, tm = np.array([1, 2], "<u2").tobytes(), np.array([5, 6], "<i8").tobytes()
    bad = {  # reason → a message whose header is readable (48 bytes, RPNT) but that is rejected
        "time_range": lambda r: _raw(r, MsgType.TICK, time=-5),
        "time_order": lambda r: _raw(r, MsgType.SPIKES, ch, np.array([6, 5], "<i8").tobytes(), time=-1, n=2),
        "payload_size": lambda r: _raw(r, MsgType.SPIKES, ch, tm, time=-1, n=3),
        "frames": lambda r: _raw(r, MsgType.TICK, b"", time=5),
        "flags": lambda r: _raw(r, MsgType.TICK, flags=1, time=5),
        "msg_type": lambda r: _raw(r, 99),
        "non_finite": lambda r: _raw(r, MsgType.KINEMATICS, np.array([1, np.nan], "<f4").tobytes(), n=1, m=2),
        "oversized": lambda r: _raw(r, MsgType.SPIKES, b"", b"", time=-1, n=10**6),
        "version": lambda r: _raw(r, MsgType.TICK, version=2, time=5),
        "reserved": lambda r: _raw(r, MsgType.TICK, time=5, aux=1),
        "channel_count": lambda r: _raw(r, MsgType.COUNTS, np.ones(7, "<u2").tobytes(), time=10**6, n=1, m=7),
    }
    ones = np.ones((1, 8), np.uint16)
    with live_daemon(FIRDecoder(), source_id=6) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        for k, make_bad in enumerate(bad.values()):
            rig.send_counts(k, ones)
            rig.send_frames(make_bad(rig))
        rig.send_counts(len(bad), ones)
        rig.send_frames([b"RPNT"])  # no readable header: no seq to account (the rig numbered nothing)
        rig.send_frames(
            [INGEST_HEADER.pack(b"XXXX", 1, MsgType.TICK, 6, 0, 10**9, 0, 0, 0, 0, 0)]
        )  # nor here
        rig.send_counts(len(bad) + 1, ones)
        preds = collect(sub, len(bad) + 1)
        status = _pong_status(rig, sub, 77)
        snap = d.snapshot()
    assert [p.bin for p in preds] == list(range(len(bad) + 1))
    assert all(p.flags & PredFlag.REJECTED for p in preds[1:]) and not any(
        p.flags & PredFlag.GAP for p in preds
    )
    assert snap["rejected"] == {**dict.fromkeys(bad, 1), "header_size": 1, "magic": 1}
    seq = snap["sequence"]["per_source"]["6"]
    assert seq["missing"] == 0 and seq["duplicates"] == 0 and seq["rejected"] == len(bad)
    assert seq["received"] == seq["sent"] == rig.seq  # every message the rig numbered, the ping included
    # the PONG tells the pinging source the same (its balance as of the PING, which it counts)
    assert status["rejected"] == snap["rejected"] and status["sequence"] == seq


def test_a_rejected_seq_0_still_restarts_the_sources_numbering():
    ones = np.ones((1, 8), np.uint16)
    with live_daemon(FIRDecoder(), source_id=8) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        for k in range(5):
            rig.send_counts(k, ones)
        preds = barrier(rig, sub)  # seqs 0..6 handled
        restarted = RigClient(endpoint=d.endpoints["ingest"], source_id=8)  # numbers from 0 again
        restarted.send_frames(_raw(restarted, MsgType.TICK, time=-1))  # seq 0, rejected (time_range)
        for k in range(5, 10):
            restarted.send_counts(k, ones)  # seqs 1..5: not duplicates of the old numbering
        preds += collect(sub, 5)
        barrier(restarted, sub)
        snap = d.snapshot()
        restarted.close()
    assert [p.bin for p in preds] == list(range(10)) and [p.n_spikes for p in preds] == [8] * 10
    assert snap["rejected"] == {"time_range": 1}
    seq = snap["sequence"]["per_source"]["8"]
    assert seq["restarts"] == 1 and seq["duplicates"] == 0 and seq["missing"] == 0 and seq["last_seq"] == 6


def test_one_message_closes_at_most_the_jump_cap_of_bins():
    """max_jump_s = 0.14 s at Δ = 20 ms: J = 7 bins exactly (0.14 / 0.02 is 7.000000000000001 in
    floating point), for an open stream and for a message that starts one."""
    assert (
        max_jump_bins(max_jump_s=0.14, bin_ns=BIN_NS) == 7
        and max_jump_bins(max_jump_s=0.09, bin_ns=BIN_NS) == 5
    )
    with live_daemon(FIRDecoder(), max_jump_s=0.14) as (d, rig, sub):
        rig.send_reset(start=0, free_run=True)
        rig.send_tick(8 * BIN_NS - 1)  # the latest time is in bin 7: 7 past the open bin 0, closes 0..6
        got = barrier(rig, sub)
        rig.send_tick(15 * BIN_NS)  # bin 15 is 8 past the open bin 7: rejected
        rig.send_tick(14 * BIN_NS)  # 7 past: closes bins 7..13
        got += barrier(rig, sub)
        rig.send_reset()  # the next stream starts at the next reported time
        rig.send_spikes([0, 1], [100 * BIN_NS, 108 * BIN_NS])  # spans 8 bins from its first: rejected
        rig.send_spikes([0, 1], [100 * BIN_NS, 106 * BIN_NS], clock=107 * BIN_NS)  # 7: closes 100..106
        got += barrier(rig, sub)
        snap = d.snapshot()
    assert [p.bin for p in got] == list(range(14)) + list(range(100, 107))
    assert snap["rejected"] == {"time_jump": 2}
    assert got[7].flags == PredFlag.REJECTED and got[14].flags == PredFlag.FIRST | PredFlag.REJECTED


def test_kinematics_rows_must_end_within_the_clock_range():
    last = (1 << 62) // BIN_NS - 1  # the last bin that ends by 2^62 ns
    two = np.zeros((2, 2), np.float32)
    with live_daemon(FIRDecoder()) as (d, rig, sub):
        rig.send_kinematics(last - 1, two)  # rows last-1, last: fine (no stream yet: held for the next)
        rig.send_kinematics(last, two)  # its second row would be bin last+1
        barrier(rig, sub)
        snap = d.snapshot()
    assert snap["rejected"] == {"time_range": 1} and snap["counters"]["kinematics_msgs"] == 2


class _PrewarmedFIR(FIRDecoder):
    """A FIR decoder that counts ``prewarm()`` calls (and must not change its stream)."""

    def __init__(self, **kw) -> None:
        self.prewarms = 0
        super().__init__(**kw)

    def prewarm(self) -> None:
        self.prewarms += 1


def test_prewarm_runs_ahead_of_bins_and_changes_no_prediction():
    counts = poisson(40, seed=4)
    dec = _PrewarmedFIR()
    with live_daemon(dec, prewarm_lead_us=int(BIN_NS // 1000)) as (d, rig, sub):
        assert d.status()["startup"]["prewarm"] == {"requested_lead_us": BIN_NS // 1000, "applied": True}
        send_stream(rig, counts, free_run=False)  # bins have wall-clock due times
        preds = collect(sub, 40)
        assert wait_until(lambda: dec.prewarms >= 1)  # the open bin comes due (wall clock) after the burst
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))
