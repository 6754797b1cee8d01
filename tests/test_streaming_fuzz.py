"""Fuzzing a live daemon: thousands of random, mutated and hostile-but-well-formed frames over a real
ZeroMQ socket; afterwards the daemon is alive, has counted what it rejected, and a clean stream
still decodes exactly."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_streaming_support import BIN_NS, FIRDecoder, collect, live_daemon, offline, send_stream, until_pong

from streaming.protocol import (
    INGEST_HEADER,
    MAGIC,
    Pong,
    PredFlag,
    Prediction,
    ProtocolError,
    encode_counts,
    encode_kinematics,
    encode_ping,
    encode_reset,
    encode_spikes,
    encode_tick,
    parse_ingest,
)

N = 8
CLEAN = 3_000_000_000  # the clean stream's source id: outside the fuzzer's (else its seqs could clash)


def _valid(rng: np.random.Generator) -> list[bytes]:
    """A well-formed message with random (often hostile) content."""
    src, seq = int(rng.integers(0, 64)), int(rng.integers(0, 1 << 20))
    t0 = int(rng.integers(0, 50)) * BIN_NS
    kind = rng.integers(0, 8)
    if kind <= 2:
        n = int(rng.integers(0, 40))
        ch = rng.integers(0, N + 2 if rng.random() < 0.2 else N, n)
        tm = np.sort(t0 + rng.integers(0, 5 * BIN_NS, n))
        if rng.random() < 0.1 and n > 1:
            tm = tm[::-1]  # decreasing
        clock = None if rng.random() < 0.3 else int(tm[-1] if n else t0) + int(rng.integers(0, BIN_NS))
        return encode_spikes(
            source=src, seq=seq, channels=ch, times=tm, clock=clock, rate_hz=int(rng.choice([0, 0, 30_000]))
        )
    if kind == 3:
        return encode_tick(source=src, seq=seq, clock=int(rng.choice([t0, rng.integers(0, 1 << 62)])))
    if kind == 4:
        m = int(rng.choice([N, N, N - 1, 1]))
        return encode_counts(
            source=src,
            seq=seq,
            first=int(rng.integers(0, 100)),
            counts=rng.integers(0, 5, (int(rng.integers(1, 4)), m)),
            bin_ns=int(rng.choice([0, BIN_NS, 7])),
        )
    if kind == 5:
        v = rng.standard_normal((int(rng.integers(1, 4)), int(rng.choice([2, 2, 3]))))
        if rng.random() < 0.2:
            v[0, 0] = rng.choice([np.nan, np.inf])
        return encode_kinematics(source=src, seq=seq, first=int(rng.integers(0, 10**6)), values=v)
    if kind == 6:
        return encode_reset(
            source=src, seq=seq, start=None if rng.random() < 0.5 else t0, free_run=bool(rng.random() < 0.5)
        )
    return encode_ping(source=src, seq=seq, token=int(rng.integers(0, 1 << 40)))


def _mutate(frames: list[bytes], rng: np.random.Generator) -> list[bytes]:
    fr = [bytearray(f) for f in frames]
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(0, 7)
        i = int(rng.integers(0, len(fr))) if fr else 0
        if op == 0 and fr and fr[i]:
            j = int(rng.integers(0, len(fr[i])))
            fr[i][j] ^= 1 << int(rng.integers(0, 8))
        elif op == 1 and fr:
            del fr[i][int(rng.integers(0, len(fr[i]) + 1)) :]
        elif op == 2 and fr:
            fr[i].extend(rng.bytes(int(rng.integers(1, 24))))
        elif op == 3 and fr:
            fr.pop(i)
        elif op == 4 and fr:
            fr.append(bytearray(fr[i]))
        elif op == 5 and fr and len(fr[0]) == INGEST_HEADER.size:
            off, fmt = [
                (4, "<H"),
                (6, "<H"),
                (12, "<I"),
                (16, "<Q"),
                (24, "<q"),
                (32, "<I"),
                (36, "<I"),
                (40, "<I"),
                (44, "<I"),
            ][int(rng.integers(0, 9))]
            size = struct.calcsize(fmt)
            fr[0][off : off + size] = rng.bytes(size)
        elif op == 6:
            fr.insert(0, bytearray(MAGIC + rng.bytes(int(rng.integers(0, 60)))))
    return [bytes(f) for f in fr] or [b""]  # ZeroMQ cannot send a message of zero frames


def _random_frames(rng: np.random.Generator) -> list[bytes]:
    r = rng.random()
    if r < 0.15:
        return [rng.bytes(int(rng.integers(0, 120))) for _ in range(int(rng.integers(1, 5)))]
    if r < 0.25:  # a header with random fields and random payload frames
        h = INGEST_HEADER.pack(
            MAGIC,
            int(rng.choice([1, 1, 0, 2])),
            int(rng.integers(0, 20)),
            int(rng.integers(0, 1 << 32)),
            int(rng.integers(0, 4)),
            int(rng.integers(0, 1 << 63)),
            int(rng.integers(-(1 << 63), 1 << 63)),
            int(rng.integers(0, 1 << 32)),
            int(rng.integers(0, 1 << 32)),
            int(rng.integers(0, 1 << 32)),
            int(rng.integers(0, 1 << 32)),
        )
        return [h] + [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(0, 3)))]
    if r < 0.27:  # oversized: more events than the limit, with a real payload
        n = 262_145
        return encode_spikes(source=1, seq=0, channels=np.zeros(n, int), times=np.zeros(n, int))
    m = _valid(rng)
    return _mutate(m, rng) if r < 0.7 else m


_TOKENS = iter(range(1 << 40, 1 << 41))


def _ping_barrier(push: zmq.Socket, sub) -> dict:
    """PING through the fuzzing socket itself: everything sent before it has been handled."""
    token = next(_TOKENS)  # fresh per call: a late PONG of an earlier barrier must not count
    while True:
        push.send_multipart(
            encode_ping(source=4_000_000_000, seq=0, token=token)
        )  # seq 0: a 'restart', never a dup
        for _ in range(200):
            m = sub.recv(0.05)
            if isinstance(m, Pong) and m.token == token and m.source == 4_000_000_000:
                return m.status
            if m is None:
                break


def test_thousands_of_fuzzed_frames_then_a_clean_stream_decodes_exactly():
    counts = np.random.default_rng(99).poisson(1.5, (300, N))
    rng = np.random.default_rng(2024)
    # max_jump_s bounds how many bins one accepted message may close (here 10); with the default 10 s a
    # well-formed message may legitimately close 500 bins, and the fuzzer finds many such messages
    with live_daemon(FIRDecoder(), max_sources=16, max_jump_s=0.2, source_id=CLEAN) as (d, rig, sub):
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(d.endpoints["ingest"])
        for _ in range(5000):
            push.send_multipart(_random_frames(rng))
        status = _ping_barrier(push, sub)
        snap = d.snapshot()
        assert d.running and status["running"]
        # a clean stream afterwards, from the reference client
        send_stream(rig, counts)
        preds = collect(sub, 300, where=lambda p: p.epoch == status["epoch"] + 1)
        after = d.snapshot()
        push.close(0)
    rejected = snap["rejected"]
    assert snap["counters"]["messages"] >= 5000
    assert sum(rejected.values()) > 1000 and len(rejected) >= 12, rejected
    assert "internal" not in rejected, rejected  # no unexpected exception anywhere in the loop
    assert snap["sequence"]["tracked"] <= 16 and snap["sequence"]["evicted"] > 0
    assert [p.bin for p in preds] == list(range(300))
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))
    assert [p.n_spikes for p in preds] == counts.sum(1).tolist()
    assert after["counters"]["decode_errors"] == 0


@pytest.fixture(scope="module")
def fuzz_target():
    with live_daemon(FIRDecoder(), max_sources=8, max_jump_s=0.2, source_id=CLEAN) as handles:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(handles[0].endpoints["ingest"])
        yield (*handles, push)
        push.close(0)


@given(
    batch=st.lists(st.lists(st.binary(max_size=64), min_size=1, max_size=4), min_size=50, max_size=120),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_property_any_batch_of_frames_leaves_the_daemon_decoding_exactly(fuzz_target, batch, seed):
    d, rig, sub, push = fuzz_target
    rng = np.random.default_rng(seed)
    for frames in batch:  # hypothesis' bytes, and mutated well-formed messages in between
        push.send_multipart(frames)
        push.send_multipart(_random_frames(rng))
    status = _ping_barrier(push, sub)
    counts = rng.poisson(1.0, (12, N))
    send_stream(rig, counts, first_bin=int(rng.integers(0, 10**6)))
    preds = collect(sub, 12, where=lambda p: p.epoch == status["epoch"] + 1)
    assert len(preds) == 12 and d.running
    np.testing.assert_array_equal(np.stack([p.velocity for p in preds]), offline(FIRDecoder(), counts))
    assert "internal" not in d.snapshot()["rejected"]


def _honest(frames: list[bytes], *, source: int, seq: int) -> list[bytes] | None:
    """``frames`` numbered as message ``seq`` of ``source``, or None if frame 0 is no readable header
    (not 48 bytes starting with RPNT: such a message has no seq for the daemon to account)."""
    if not frames or len(frames[0]) != INGEST_HEADER.size or frames[0][:4] != MAGIC:
        return None
    h = bytearray(frames[0])
    struct.pack_into("<I", h, 8, source)
    struct.pack_into("<Q", h, 16, seq)
    return [bytes(h), *frames[1:]]


def test_hostile_messages_from_an_honestly_numbered_source_are_rejected_never_lost():
    """One source numbers every message it sends, valid or not: whatever the daemon rejects, it
    counts as received — the balance shows nothing missing and no prediction carries GAP."""
    rng = np.random.default_rng(7)
    src = 3_500_000_000
    expected: dict[str, int] = {}  # the reasons the parser alone gives, counted here
    sent = []
    while len(sent) < 3000:
        frames = _honest(
            _mutate(_valid(rng), rng) if rng.random() < 0.6 else _valid(rng), source=src, seq=len(sent)
        )
        if frames is None:
            continue
        try:
            parse_ingest(frames)
        except ProtocolError as exc:
            expected[exc.reason] = expected.get(exc.reason, 0) + 1
        sent.append(frames)
    with live_daemon(FIRDecoder(), max_jump_s=0.2, source_id=CLEAN) as (d, rig, sub):
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(d.endpoints["ingest"])
        preds = []
        for frames in sent:
            push.send_multipart(frames)
            while (m := sub.recv(0)) is not None:
                preds.append(m)
        token = next(_TOKENS)
        push.send_multipart(encode_ping(source=src, seq=len(sent), token=token))  # the last of this source
        preds += until_pong(sub, token)
        snap = d.snapshot()
        push.close(0)
    seq = snap["sequence"]["per_source"][str(src)]
    assert seq["received"] == seq["sent"] == len(sent) + 1
    assert seq["missing"] == 0 and seq["duplicates"] == 0 and snap["counters"]["gaps"] == 0
    assert not any(isinstance(p, Prediction) and p.flags & PredFlag.GAP for p in preds)
    assert any(isinstance(p, Prediction) and p.flags & PredFlag.REJECTED for p in preds)
    # every parser-level reason the daemon gave is the parser's own, exactly; others (time_regression,
    # time_jump, …) come on top from the daemon's stream checks, and time_range from both
    assert len(expected) >= 9, expected
    for reason, n in expected.items():
        assert snap["rejected"][reason] == n if reason != "time_range" else snap["rejected"][reason] >= n, (
            reason
        )
    assert seq["rejected"] == sum(snap["rejected"].values())
