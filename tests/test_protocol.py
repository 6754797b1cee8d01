"""streaming.protocol: byte layouts (checked against docs/protocol.md), round trips, every reject
reason, and totality of the parser on arbitrary bytes (property test)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.protocol import (
    INGEST_HEADER,
    MAGIC,
    NO_TIME,
    PREDICTION_HEADER,
    PREDICTION_TOPIC,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    IngestMessage,
    Limits,
    MsgType,
    Pong,
    PredFlag,
    Prediction,
    ProtocolError,
    encode_counts,
    encode_kinematics,
    encode_ping,
    encode_pong,
    encode_prediction,
    encode_reset,
    encode_spikes,
    encode_tick,
    parse_ingest,
    parse_output,
    sample_to_ns,
    samples_to_ns,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _doc_frames(title_fragment: str) -> list[bytes]:
    """The hex frames of the example in docs/protocol.md whose lead-in mentions ``title_fragment``."""
    text = DOC.read_text()
    i = text.index(title_fragment)
    block = text[i:].split("```", 2)[1]
    return [bytes.fromhex(m.group(1)) for m in re.finditer(r"frame \d+: ([0-9a-f ]+)", block)]


def test_header_layouts_are_the_documented_sizes():
    assert INGEST_HEADER.size == 48 and INGEST_HEADER.format == "<4sHHIIQqIIII"
    assert PREDICTION_HEADER.size == 88 and PREDICTION_HEADER.format == "<4sHHIIqqqIIqqqqII"
    text = DOC.read_text()
    assert "<4sHHIIQqIIII" in text and "<4sHHIIqqqIIqqqqII" in text
    assert bytes.fromhex("52504e5401001000") == PREDICTION_TOPIC
    assert "52 50 4e 54 01 00 10 00" in text
    for reason in REJECT_REASONS:  # every reason the daemon can count is documented
        assert f"| `{reason}` |" in text, reason


def test_doc_examples_match_the_encoder_byte_for_byte():
    frames = encode_spikes(source=7, seq=42, channels=[3, 17], times=[1_250_000, 4_000_000], clock=5_000_000)
    assert frames == _doc_frames("A SPIKES packet from source 7")
    pred = encode_prediction(
        bin=12,
        bin_ns=20_000_000,
        velocity_bytes=np.array([0.5, -1.25], "<f4").tobytes(),
        n_outputs=2,
        model_version=b"3f2a9c01b7e4",
        flags=int(PredFlag.FIRST),
        epoch=1,
        generation=1,
        t_recv_ns=1000,
        t_close_ns=1100,
        t_infer_ns=1400,
        t_publish_ns=1450,
        n_spikes=5,
    )
    assert pred == _doc_frames("A PREDICTION for bin 12")
    p = parse_output(pred)
    assert (p.bin, p.bin_start_ns, p.bin_end_ns, p.flags, p.model_version) == (
        12,
        240_000_000,
        260_000_000,
        8,
        "3f2a9c01b7e4",
    )
    np.testing.assert_array_equal(p.velocity, [0.5, -1.25])


def test_ingest_round_trips():
    m = parse_ingest(encode_spikes(source=3, seq=9, channels=[1, 0, 5], times=[10, 10, 30], clock=45))
    assert (m.type, m.source, m.seq, m.clock_ns) == (MsgType.SPIKES, 3, 9, 45)
    np.testing.assert_array_equal(m.channels, [1, 0, 5])
    np.testing.assert_array_equal(m.times_ns, [10, 10, 30])
    assert parse_ingest(encode_spikes(source=0, seq=0, channels=[], times=[])).clock_ns is None
    assert parse_ingest(encode_tick(source=1, seq=2, clock=777)).clock_ns == 777
    c = np.arange(12, dtype=np.uint16).reshape(3, 4)
    m = parse_ingest(encode_counts(source=1, seq=3, first=5, counts=c, bin_ns=20_000_000))
    assert (m.first, m.time_is_clock, m.aux) == (5, False, 20_000_000)
    np.testing.assert_array_equal(m.counts, c)
    m = parse_ingest(encode_counts(source=1, seq=3, first=123_456, counts=c, time_is_clock=True))
    assert (m.first, m.time_is_clock) == (123_456, True)
    v = np.array([[0.5, -2.0]], np.float32)
    m = parse_ingest(encode_kinematics(source=1, seq=4, first=7, values=v))
    np.testing.assert_array_equal(m.values, v)
    m = parse_ingest(encode_reset(source=1, seq=5, start=40, free_run=True))
    assert (m.type, m.clock_ns, m.free_run) == (MsgType.RESET, 40, True)
    assert parse_ingest(encode_reset(source=1, seq=6)).clock_ns is None
    assert parse_ingest(encode_ping(source=1, seq=7, token=-5)).token == -5


def test_sample_clock_converts_exactly():
    # 30 kHz samples → ns: floor(s · 1e9 / 30000), also for huge sample indices
    for s in (0, 1, 2, 29_999, 30_000, 10**12 + 7):
        assert sample_to_ns(s, 30_000) == (s * 10**9) // 30_000
    arr = np.array([0, 1, 2, 29_999, 30_000, 10**12 + 7], dtype=np.int64)
    np.testing.assert_array_equal(samples_to_ns(arr, 30_000), [sample_to_ns(int(x), 30_000) for x in arr])
    m = parse_ingest(
        encode_spikes(source=0, seq=0, channels=[0, 1], times=[600, 601], clock=1200, rate_hz=30_000)
    )
    np.testing.assert_array_equal(m.times_ns, [20_000_000, 20_033_333])
    assert m.clock_ns == 40_000_000


@given(s=st.integers(0, (1 << 62) // 10**9 * 30_000), rate=st.integers(1, 1 << 31))
@settings(max_examples=200, deadline=None)
def test_sample_conversion_matches_big_integers(s, rate):
    if s > (1 << 62) // 10**9 * rate:
        return
    assert sample_to_ns(s, rate) == (s * 10**9) // rate
    assert int(samples_to_ns(np.array([s], np.int64), rate)[0]) == (s * 10**9) // rate


def test_output_round_trips():
    frames = encode_prediction(
        bin=-3,
        bin_ns=50_000_000,
        velocity_bytes=np.zeros(3, np.float32).tobytes(),
        n_outputs=3,
        model_version=b"v",
        flags=5,
        epoch=2**32 + 1,
        generation=7,
        t_recv_ns=1,
        t_close_ns=2,
        t_infer_ns=3,
        t_publish_ns=4,
        n_spikes=2**40,
    )
    p = parse_output(frames)
    assert isinstance(p, Prediction)
    assert (p.bin, p.bin_start_ns, p.epoch, p.generation, p.n_spikes) == (-3, -150_000_000, 1, 7, 2**32 - 1)
    pong = parse_output(encode_pong(token=99, source=4, seq=8, status={"bin_ns": 20_000_000}))
    assert isinstance(pong, Pong) and (pong.token, pong.source, pong.status["bin_ns"]) == (99, 4, 20_000_000)


def _hdr(
    t, *, version=PROTOCOL_VERSION, magic=MAGIC, source=1, flags=0, seq=0, time=0, rate=0, n=0, m=0, aux=0
):
    return INGEST_HEADER.pack(magic, version, t, source, flags, seq, time, rate, n, m, aux)


ch2 = np.array([1, 2], "<u2").tobytes()
tm2 = np.array([5, 6], "<i8").tobytes()
BAD = {
    "frames": [[], [_hdr(MsgType.SPIKES, n=2), ch2], [_hdr(MsgType.TICK, time=5), b""]],
    "header_size": [[b"RPNT"], [_hdr(MsgType.TICK) + b"\0"]],
    "magic": [[_hdr(MsgType.TICK, magic=b"RPNX")]],
    "version": [[_hdr(MsgType.TICK, version=2)], [_hdr(MsgType.TICK, version=0)]],
    "msg_type": [[_hdr(99)], [_hdr(MsgType.PREDICTION)], [_hdr(MsgType.PONG)]],
    "flags": [[_hdr(MsgType.TICK, flags=1)], [_hdr(MsgType.RESET, flags=4)]],
    "payload_size": [
        [_hdr(MsgType.SPIKES, n=3), ch2, tm2],
        [_hdr(MsgType.COUNTS, n=1, m=2), b"\0\0"],
        [_hdr(MsgType.COUNTS, n=0, m=0), b""],
    ],
    "oversized": [[_hdr(MsgType.SPIKES, n=10**6), b"", b""], [_hdr(MsgType.KINEMATICS, n=5000, m=1), b""]],
    "time_range": [
        [_hdr(MsgType.TICK, time=-1)],
        [_hdr(MsgType.TICK, time=(1 << 62) + 1)],
        [_hdr(MsgType.SPIKES, n=2, time=-7), ch2, tm2],
        [_hdr(MsgType.SPIKES, n=2), ch2, np.array([-1, 6], "<i8").tobytes()],
        [_hdr(MsgType.COUNTS, n=1, m=1, time=-2), b"\0\0"],
    ],
    "time_order": [
        [_hdr(MsgType.SPIKES, n=2, time=-1), ch2, np.array([6, 5], "<i8").tobytes()],
        [_hdr(MsgType.SPIKES, n=2, time=5), ch2, tm2],
    ],
    "reserved": [
        [_hdr(MsgType.TICK, time=5, n=1)],
        [_hdr(MsgType.TICK, time=5, aux=20_000_000)],
        [_hdr(MsgType.SPIKES, n=2, m=1, time=-1), ch2, tm2],
        [_hdr(MsgType.SPIKES, aux=1, time=-1), b"", b""],
        [_hdr(MsgType.KINEMATICS, n=1, m=1, aux=1), b"\0\0\0\0"],
        [_hdr(MsgType.RESET, m=3)],
        [_hdr(MsgType.PING, n=1)],
    ],
    "non_finite": [
        [_hdr(MsgType.KINEMATICS, n=1, m=2), np.array([1.0, np.nan], "<f4").tobytes()],
        [_hdr(MsgType.KINEMATICS, n=1, m=1), np.array([np.inf], "<f4").tobytes()],
    ],
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_malformed_message_is_rejected_with_its_reason(reason):
    for frames in BAD[reason]:
        with pytest.raises(ProtocolError) as ei:
            parse_ingest(frames)
        assert ei.value.reason == reason, (frames, ei.value)
        assert ei.value.reason in REJECT_REASONS


def test_limits_are_configurable():
    frames = encode_spikes(source=0, seq=0, channels=[0] * 5, times=[0] * 5)
    parse_ingest(frames)
    with pytest.raises(ProtocolError, match="oversized"):
        parse_ingest(frames, Limits(max_events=4))


def _valid_messages() -> list[list[bytes]]:
    return [
        encode_spikes(source=1, seq=1, channels=[0, 3, 2], times=[100, 200, 300], clock=400),
        encode_tick(source=1, seq=2, clock=10**9),
        encode_counts(source=2, seq=3, first=4, counts=np.ones((2, 3), np.uint16)),
        encode_kinematics(source=2, seq=4, first=4, values=np.ones((2, 2), np.float32)),
        encode_reset(source=1, seq=5, start=0, free_run=True),
        encode_ping(source=1, seq=6, token=3),
    ]


@st.composite
def _mutated(draw):
    frames = [bytearray(f) for f in draw(st.sampled_from(_valid_messages()))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup", "field"]))
        if op == "drop" and frames:
            frames.pop(draw(st.integers(0, len(frames) - 1)))
        elif op == "dup" and frames:
            frames.append(bytearray(frames[draw(st.integers(0, len(frames) - 1))]))
        elif frames:
            i = draw(st.integers(0, len(frames) - 1))
            f = frames[i]
            if op == "flip" and f:
                j = draw(st.integers(0, len(f) - 1))
                f[j] ^= 1 << draw(st.integers(0, 7))
            elif op == "truncate":
                del f[draw(st.integers(0, len(f))) :]
            elif op == "extend":
                f.extend(draw(st.binary(min_size=1, max_size=16)))
            elif op == "field" and len(f) == 48:
                off = draw(st.sampled_from([4, 6, 12, 24, 32, 36, 40, 44]))
                size = 2 if off in (4, 6) else 8 if off == 24 else 4
                f[off : off + size] = draw(st.binary(min_size=size, max_size=size))
    return [bytes(f) for f in frames]


@given(frames=st.one_of(st.lists(st.binary(max_size=80), max_size=4), _mutated()))
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parser_is_total_on_arbitrary_and_mutated_frames(frames):
    """Any bytes → a valid message (arrays consistent with the header) or a ProtocolError."""
    try:
        m = parse_ingest(frames)
    except ProtocolError as exc:
        assert exc.reason in REJECT_REASONS
        return
    assert isinstance(m, IngestMessage)
    if m.type is MsgType.SPIKES:
        assert m.channels.shape == m.times_ns.shape
        if m.times_ns.size:
            assert (np.diff(m.times_ns) >= 0).all() and m.times_ns[0] >= 0
            assert m.clock_ns is None or m.clock_ns >= m.times_ns[-1]
    if m.type is MsgType.KINEMATICS:
        assert np.isfinite(m.values).all()
    if m.type is MsgType.TICK:
        assert m.clock_ns >= 0


def test_no_time_sentinel():
    assert NO_TIME == -1
    assert struct.unpack_from("<q", encode_spikes(source=0, seq=0, channels=[], times=[])[0], 24)[0] == -1
