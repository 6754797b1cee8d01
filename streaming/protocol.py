"""The rpnt streaming wire protocol, version 1: bytes ⇄ typed messages.  No sockets here.

(Over 500 lines on purpose: the whole wire format in one file, to read side by side with its doc.)

The normative description (byte layouts, semantics, examples) is ``docs/protocol.md``; this
module is its executable twin and the two must agree (``tests/test_protocol.py`` checks the
layouts byte for byte).

Every message is a ZeroMQ multipart message.  Frame 0 is a fixed-size little-endian header that
starts with the magic ``b"RPNT"``, the protocol version and the message type; further frames are
raw little-endian arrays whose dtypes are fixed by the type (no pickle, no JSON on the hot path).

Ingest (rig → daemon, PUSH → the daemon's PULL), header :data:`INGEST_HEADER` (48 bytes)::

    SPIKES      [hdr, channels (n,) <u2, times (n,) <i8]   events; hdr.time = clock or -1
    TICK        [hdr]                                       heartbeat; hdr.time = clock
    COUNTS      [hdr, counts (n, m) <u2]                    n already-binned bins of m channels
    KINEMATICS  [hdr, values (n, m) <f4]                    n bins of m-dim behaviour (velocity)
    RESET       [hdr]                                       new stream; hdr.time = start or -1
    PING        [hdr]                                       hdr.time = token, echoed in a PONG

Output (daemon → clients, the daemon's PUB → SUB)::

    PREDICTION  [hdr (88 bytes, :data:`PREDICTION_HEADER`), velocity (D,) <f4, model version utf-8]
    PONG        [hdr (48 bytes, the ingest layout), status JSON utf-8]

Parsing is total: :func:`parse_ingest` either returns an :class:`IngestMessage` whose arrays
have been checked against the header (sizes, limits, stateless value rules: ordered and
in-range times, finite kinematics) or raises :class:`ProtocolError` carrying one reason from
:data:`REJECT_REASONS`.  Any input, including random bytes, ends in one of those two outcomes.
It runs in two steps so that the daemon can account sequence numbers in between:
:func:`read_header` (is frame 0 a readable header, i.e. are ``source_id`` and ``seq`` known?)
and :func:`parse_body` (is the rest protocol v1?).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Callable, Sequence

import numpy as np

MAGIC = b"RPNT"
PROTOCOL_VERSION = 1

#: magic, version, msg_type, source_id, flags, seq, time, rate_hz, n, m, aux
INGEST_HEADER = struct.Struct("<4sHHIIQqIIII")  # 48 bytes
#: magic, version, msg_type, flags, n_outputs, bin, bin_start_ns, bin_end_ns, epoch, generation,
#: t_recv_ns, t_close_ns, t_infer_ns, t_publish_ns, n_spikes, reserved
PREDICTION_HEADER = struct.Struct("<4sHHIIqqqIIqqqqII")  # 88 bytes

NS_PER_S = 1_000_000_000
#: largest acquisition time accepted, in ns (≈ 146 years; keeps every product in int64)
MAX_TIME_NS = 1 << 62
NO_TIME = -1  # hdr.time of a SPIKES packet without a clock / a RESET without a start time

CHANNEL_DTYPE = np.dtype("<u2")
TIME_DTYPE = np.dtype("<i8")
COUNT_DTYPE = np.dtype("<u2")
KIN_DTYPE = np.dtype("<f4")
VELOCITY_DTYPE = np.dtype("<f4")


class MsgType(IntEnum):
    SPIKES = 1
    TICK = 2
    COUNTS = 3
    KINEMATICS = 4
    RESET = 5
    PING = 6
    PREDICTION = 16
    PONG = 17


INGEST_TYPES = frozenset(
    {MsgType.SPIKES, MsgType.TICK, MsgType.COUNTS, MsgType.KINEMATICS, MsgType.RESET, MsgType.PING}
)


class IngestFlag(IntFlag):
    """Bits of an ingest header's ``flags``.  Every other bit is reserved and must be 0."""

    TIME_IS_CLOCK = 1  # COUNTS / KINEMATICS: hdr.time is an acquisition time, not a bin index
    FREE_RUN = 2  # RESET: this stream has no wall-clock deadline (bins close on reported time only)


INGEST_FLAGS_ALLOWED = {
    MsgType.SPIKES: 0,
    MsgType.TICK: 0,
    MsgType.COUNTS: int(IngestFlag.TIME_IS_CLOCK),
    MsgType.KINEMATICS: int(IngestFlag.TIME_IS_CLOCK),
    MsgType.RESET: int(IngestFlag.FREE_RUN),
    MsgType.PING: 0,
}


class PredFlag(IntFlag):
    """Bits of a PREDICTION's ``flags``."""

    LATE = 1  # events for already-decoded bins arrived (and were dropped) since the previous prediction
    STALLED = 2  # this bin was closed by the wall-clock deadline, not by a reported time
    GAP = 4  # a sequence gap (lost packets) was detected since the previous prediction
    FIRST = 8  # first bin of a stream: the decoder state was reset before it
    SWAPPED = 16  # first bin decoded by a newly swapped-in decoder
    REJECTED = 32  # ingest messages were rejected since the previous prediction
    ERROR = 64  # the decoder raised on this bin; velocity is NaN


#: every reason a message can be rejected for (the daemon counts each one)
REJECT_REASONS = (
    "frames",  # wrong number of frames for the message type
    "header_size",  # frame 0 is not the header size
    "magic",  # frame 0 does not start with b"RPNT"
    "version",  # unknown protocol version
    "msg_type",  # unknown or output-only message type on the ingest socket
    "flags",  # reserved flag bits set
    "reserved",  # a header field the type does not use (n, m or aux) is not 0
    "payload_size",  # an array frame's byte length does not match the header's n / m
    "oversized",  # n or n*m over the daemon's limits
    "time_range",  # a negative or out-of-range time / bin index
    "time_order",  # event times not non-decreasing, or a clock earlier than the packet's events
    "time_regression",  # a source reported a time earlier than it already had
    "time_jump",  # a time too far ahead of the open bin (max_jump_s); send RESET for a new clock
    "channel_range",  # a channel id ≥ the model's channel count
    "channel_count",  # COUNTS with m ≠ the model's channel count
    "dims",  # KINEMATICS with m ≠ the daemon's kinematics width
    "non_finite",  # NaN / inf in KINEMATICS values
    "bin_width",  # COUNTS binned at another width than the daemon's
    "duplicate",  # a sequence number at or below the source's last one (not a restart at 0)
    "internal",  # an unexpected error while handling the message (a bug; the message is dropped)
)


class ProtocolError(ValueError):
    """A message that is not valid protocol v1; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-message size limits (a message over a limit is rejected as ``oversized``)."""

    max_events: int = 262_144  # SPIKES n
    max_bins: int = 4_096  # COUNTS / KINEMATICS n
    max_width: int = 65_535  # COUNTS / KINEMATICS m


DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class IngestMessage:
    """One parsed, structurally valid ingest message.

    Times are converted to integer nanoseconds on the acquisition clock (``rate_hz`` > 0 means the
    wire carried sample indices at that rate: ``ns = floor(sample · 10⁹ / rate_hz)``).

    - SPIKES: ``channels`` (n,) uint16, ``times_ns`` (n,) int64 non-decreasing, ``clock_ns`` or None.
    - TICK: ``clock_ns``.
    - COUNTS: ``first`` (bin index, or clock ns when ``time_is_clock``), ``counts`` (n, m) uint16, ``aux`` = bin width ns or 0.
    - KINEMATICS: ``first`` as COUNTS, ``values`` (n, m) float32, all finite.
    - RESET: ``clock_ns`` = stream start or None; ``free_run``.
    - PING: ``token`` (the raw hdr.time).
    """

    type: MsgType
    source: int
    seq: int
    flags: int
    clock_ns: int | None = None
    channels: np.ndarray | None = None  # (n,) uint16
    times_ns: np.ndarray | None = None  # (n,) int64
    first: int = 0
    time_is_clock: bool = False
    counts: np.ndarray | None = None  # (n, m) uint16
    values: np.ndarray | None = None  # (n, m) float32
    aux: int = 0
    free_run: bool = False
    token: int = 0


# ---------------------------------------------------------------------------- time conversion
def sample_to_ns(value: int, rate_hz: int) -> int:
    """One time on the wire → ns (``rate_hz`` 0: already ns).  Exact floor; no overflow."""
    if rate_hz == 0:
        return int(value)
    q, r = divmod(int(value), int(rate_hz))
    return q * NS_PER_S + (r * NS_PER_S) // int(rate_hz)


def samples_to_ns(values: np.ndarray, rate_hz: int) -> np.ndarray:
    """Vectorised :func:`sample_to_ns` for non-negative int64 (n,) arrays (caller checks range)."""
    if rate_hz == 0:
        return values
    q, r = np.divmod(values, np.int64(rate_hz))
    return q * NS_PER_S + (r * NS_PER_S) // np.int64(rate_hz)


def _max_wire_time(rate_hz: int) -> int:
    """Largest wire time whose ns value is ≤ MAX_TIME_NS."""
    return MAX_TIME_NS if rate_hz == 0 else (MAX_TIME_NS // NS_PER_S) * int(rate_hz)


# ---------------------------------------------------------------------------- encoding (clients)
def _hdr(
    msg_type: int,
    *,
    source: int,
    seq: int,
    flags: int = 0,
    time: int = 0,
    rate_hz: int = 0,
    n: int = 0,
    m: int = 0,
    aux: int = 0,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    return INGEST_HEADER.pack(
        MAGIC,
        version,
        int(msg_type),
        int(source),
        int(flags),
        int(seq),
        int(time),
        int(rate_hz),
        int(n),
        int(m),
        int(aux),
    )


def encode_spikes(
    *,
    source: int,
    seq: int,
    channels: Sequence[int] | np.ndarray,
    times: Sequence[int] | np.ndarray,
    clock: int | None = None,
    rate_hz: int = 0,
) -> list[bytes]:
    """SPIKES: events (channel id, time) in non-decreasing time order; ``clock`` (same units as
    ``times``) declares that the source has sent every event earlier than it."""
    ch = np.ascontiguousarray(channels, dtype=CHANNEL_DTYPE).reshape(-1)
    tm = np.ascontiguousarray(times, dtype=TIME_DTYPE).reshape(-1)
    if ch.shape != tm.shape:
        raise ValueError(f"channels {ch.shape} and times {tm.shape} differ in length")
    return [
        _hdr(
            MsgType.SPIKES,
            source=source,
            seq=seq,
            time=NO_TIME if clock is None else clock,
            rate_hz=rate_hz,
            n=ch.size,
        ),
        ch.tobytes(),
        tm.tobytes(),
    ]


def encode_tick(*, source: int, seq: int, clock: int, rate_hz: int = 0) -> list[bytes]:
    """TICK: the source's acquisition clock has reached ``clock`` (closes bins ending at or before it)."""
    return [_hdr(MsgType.TICK, source=source, seq=seq, time=clock, rate_hz=rate_hz)]


def encode_counts(
    *,
    source: int,
    seq: int,
    first: int,
    counts: np.ndarray,
    time_is_clock: bool = False,
    rate_hz: int = 0,
    bin_ns: int = 0,
) -> list[bytes]:
    """COUNTS: ``counts`` (n_bins, n_channels) for consecutive bins from ``first`` (a bin index, or
    the first bin's start time when ``time_is_clock``).  ``bin_ns``: the width they were binned at
    (0 = the daemon's)."""
    c = np.ascontiguousarray(counts, dtype=COUNT_DTYPE)
    if c.ndim != 2:
        raise ValueError(f"counts: expected (n_bins, n_channels), got {c.shape}")
    return _binned_frames(
        MsgType.COUNTS, c, first, time_is_clock, source=source, seq=seq, rate_hz=rate_hz, aux=bin_ns
    )


def encode_kinematics(
    *, source: int, seq: int, first: int, values: np.ndarray, time_is_clock: bool = False, rate_hz: int = 0
) -> list[bytes]:
    """KINEMATICS: behaviour ``values`` (n_bins, D) (or (D,): one bin) for consecutive bins from ``first``."""
    v = np.ascontiguousarray(values, dtype=KIN_DTYPE)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2:
        raise ValueError(f"values: expected (n_bins, D), got {v.shape}")
    return _binned_frames(
        MsgType.KINEMATICS, v, first, time_is_clock, source=source, seq=seq, rate_hz=rate_hz
    )


def _binned_frames(
    msg_type: MsgType,
    arr: np.ndarray,
    first: int,
    time_is_clock: bool,
    *,
    source: int,
    seq: int,
    rate_hz: int,
    aux: int = 0,
) -> list[bytes]:
    """COUNTS / KINEMATICS frames: the header for ``arr`` (n, m) from ``first``, then its bytes."""
    flags = int(IngestFlag.TIME_IS_CLOCK) if time_is_clock else 0
    n, m = arr.shape
    hdr = _hdr(msg_type, source=source, seq=seq, flags=flags, time=first, rate_hz=rate_hz, n=n, m=m, aux=aux)
    return [hdr, arr.tobytes()]


def encode_reset(
    *, source: int, seq: int, start: int | None = None, free_run: bool = False, rate_hz: int = 0
) -> list[bytes]:
    """RESET: end the current stream; the next one starts at bin ⌊start/Δ⌋ (or at the next reported time)."""
    return [
        _hdr(
            MsgType.RESET,
            source=source,
            seq=seq,
            flags=int(IngestFlag.FREE_RUN) if free_run else 0,
            time=NO_TIME if start is None else start,
            rate_hz=rate_hz,
        )
    ]


def encode_ping(*, source: int, seq: int, token: int) -> list[bytes]:
    """PING: the daemon answers with a PONG carrying ``token`` and its status on the PUB socket."""
    return [_hdr(MsgType.PING, source=source, seq=seq, time=token)]


# ---------------------------------------------------------------------------- parsing (daemon)
def _frame(frames: Sequence[Any], i: int) -> memoryview:
    f = frames[i]
    return f if isinstance(f, memoryview) else memoryview(f)


def read_header(frames: Sequence[bytes | memoryview]) -> tuple:
    """Frame 0 of a message → the header tuple (magic … aux), checking only what makes it readable:
    a frame 0 of :data:`INGEST_HEADER` size that starts with :data:`MAGIC`.

    A message that passes carries a trustworthy ``source_id`` and ``seq`` (their offsets are the
    same in every protocol version), so the daemon accounts its sequence number before
    :func:`parse_body` judges the rest.  Raises :class:`ProtocolError` (``frames``,
    ``header_size``, ``magic``) otherwise."""
    if not frames:
        raise ProtocolError("frames", "empty message")
    frame = frames[0]
    if len(frame) != INGEST_HEADER.size:
        raise ProtocolError("header_size", f"{len(frame)} bytes, expected {INGEST_HEADER.size}")
    h = INGEST_HEADER.unpack(frame)
    if h[0] != MAGIC:
        raise ProtocolError("magic", "frame 0 does not start with RPNT")
    return h


# plain ints on the hot path (IntEnum / IntFlag arithmetic and hashing run Python code)
_TIME_IS_CLOCK = int(IngestFlag.TIME_IS_CLOCK)
_FREE_RUN = int(IngestFlag.FREE_RUN)


def parse_ingest(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> IngestMessage:
    """Frames of one ingest message → :class:`IngestMessage`, or :class:`ProtocolError`
    (:func:`read_header` then :func:`parse_body`)."""
    return parse_body(read_header(frames), frames, limits)


def parse_body(
    header: tuple, frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS
) -> IngestMessage:
    """A readable header (from :func:`read_header`) and the message's frames → :class:`IngestMessage`,
    or :class:`ProtocolError` for anything else that is not protocol v1 (version, type, flags,
    reserved fields, frame count, array sizes, limits, stateless value rules).

    The checks every type shares run here, in this order; then the type's own parser (:data:`_KINDS`)
    checks its arrays and values."""
    _, version, mtype, source, flags, seq, _, _, n, m, aux = header
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version}, this daemon speaks {PROTOCOL_VERSION}")
    kind = _KINDS.get(mtype)
    if kind is None:
        if mtype in (MsgType.PREDICTION, MsgType.PONG):
            raise ProtocolError(
                "msg_type", f"{MsgType(mtype).name} is an output message, not accepted on ingest"
            )
        raise ProtocolError("msg_type", f"unknown message type {mtype}")
    if flags & ~kind.flags_ok:
        raise ProtocolError("flags", f"reserved flag bits {flags:#x} set on {kind.type.name}")
    zn, zm, za = kind.zero
    if (zn and n) or (zm and m) or (za and aux):
        raise ProtocolError("reserved", _reserved_detail(kind, n, m, aux))
    if len(frames) != kind.n_frames:
        raise ProtocolError("frames", f"{kind.type.name} has {kind.n_frames} frame(s), got {len(frames)}")
    msg = IngestMessage(type=kind.type, source=source, seq=seq, flags=flags)
    kind.parse(msg, header, frames, limits)
    return msg


def _reserved_detail(kind: _Kind, n: int, m: int, aux: int) -> str:
    """The reject detail: the header fields that must be 0 on this type but are not, with their values."""
    zn, zm, za = kind.zero
    bad = [f"{name}={v}" for name, v, zero in (("n", n, zn), ("m", m, zm), ("aux", aux, za)) if zero and v]
    return f"{', '.join(bad)} on {kind.type.name}: must be 0"


def _wire_clock(time: int, rate: int, what: str) -> int:
    """A header time (a clock, a stream start) → ns; ``time_range`` unless 0 ≤ time ≤ the largest."""
    if time < 0 or time > _max_wire_time(rate):
        raise ProtocolError("time_range", f"{what} {time}")
    return sample_to_ns(time, rate)


# ---------------------------------------------------------------------------- one parser per type
# Each fills in the type's fields of ``msg`` (type, source, seq and flags are set) from the header
# tuple ``h`` (``h[6:]`` = time, rate_hz, n, m, aux) and the frames, once parse_body's checks passed.
def _parse_spikes(msg: IngestMessage, h: tuple, frames: Sequence[Any], limits: Limits) -> None:
    time, rate, n, _, _ = h[6:]
    if n > limits.max_events:
        raise ProtocolError("oversized", f"{n} events > {limits.max_events}")
    b1, b2 = _frame(frames, 1), _frame(frames, 2)
    if len(b1) != 2 * n or len(b2) != 8 * n:
        raise ProtocolError(
            "payload_size",
            f"n={n}: channels {len(b1)} B (want {2 * n}), times {len(b2)} B (want {8 * n})",
        )
    msg.clock_ns = None if time == NO_TIME else _wire_clock(time, rate, "clock")
    msg.channels = np.frombuffer(b1, dtype=CHANNEL_DTYPE)
    tm = np.frombuffer(b2, dtype=TIME_DTYPE)
    # (an empty SPIKES without a clock carries nothing but its sequence number)
    msg.times_ns = _event_times_ns(tm, rate, msg.clock_ns) if n else tm


def _event_times_ns(tm: np.ndarray, rate: int, clock: int | None) -> np.ndarray:
    """A SPIKES packet's wire times (n ≥ 1,) int64 → ns (n,) int64, after checking that they are
    non-decreasing (``time_order``), in range (``time_range``) and not after ``clock`` (``time_order``)."""
    lo, hi = int(tm[0]), int(tm[-1])
    if tm.shape[0] > 1 and bool((tm[1:] < tm[:-1]).any()):
        raise ProtocolError("time_order", "event times must be non-decreasing within a packet")
    if lo < 0 or hi > _max_wire_time(rate):
        raise ProtocolError("time_range", f"event times span [{lo}, {hi}]")
    tm = samples_to_ns(tm, rate)
    if clock is not None and clock < int(tm[-1]):
        raise ProtocolError("time_order", "clock is earlier than the packet's last event")
    return tm


def _parse_tick(msg: IngestMessage, h: tuple, frames: Sequence[Any], limits: Limits) -> None:
    msg.clock_ns = _wire_clock(h[6], h[7], "tick clock")


def _parse_binned(msg: IngestMessage, h: tuple, frames: Sequence[Any], limits: Limits) -> None:
    """COUNTS (``counts`` uint16, ``aux``) and KINEMATICS (``values`` float32, all finite): (n, m)
    rows from ``first``, a bin index or (``time_is_clock``) the first bin's start in ns."""
    time, rate, n, m, aux = h[6:]
    if n > limits.max_bins or m > limits.max_width:
        raise ProtocolError("oversized", f"{n} bins × {m} > limits ({limits.max_bins} × {limits.max_width})")
    if n == 0 or m == 0:
        raise ProtocolError("payload_size", f"{msg.type.name} needs n ≥ 1 and m ≥ 1, got n={n}, m={m}")
    is_counts = msg.type is MsgType.COUNTS
    dtype = COUNT_DTYPE if is_counts else KIN_DTYPE
    b1 = _frame(frames, 1)
    if len(b1) != dtype.itemsize * n * m:
        raise ProtocolError("payload_size", f"{len(b1)} B for {n}×{m} {dtype.str}")
    by_clock = msg.time_is_clock = bool(msg.flags & _TIME_IS_CLOCK)
    if time < 0 or time > (_max_wire_time(rate) if by_clock else MAX_TIME_NS):
        raise ProtocolError("time_range", f"first {'time' if by_clock else 'bin'} {time}")
    msg.first = sample_to_ns(time, rate) if by_clock else int(time)
    arr = np.frombuffer(b1, dtype=dtype).reshape(n, m)
    if is_counts:
        msg.counts, msg.aux = arr, aux
    elif not bool(np.isfinite(arr).all()):
        raise ProtocolError("non_finite", "kinematics contain NaN or inf")
    else:
        msg.values = arr


def _parse_reset(msg: IngestMessage, h: tuple, frames: Sequence[Any], limits: Limits) -> None:
    msg.clock_ns = None if h[6] == NO_TIME else _wire_clock(h[6], h[7], "reset start")
    msg.free_run = bool(msg.flags & _FREE_RUN)


def _parse_ping(msg: IngestMessage, h: tuple, frames: Sequence[Any], limits: Limits) -> None:
    msg.token = h[6]


@dataclass(frozen=True, slots=True)
class _Kind:
    """How :func:`parse_body` checks and parses one ingest message type."""

    type: MsgType
    n_frames: int
    zero: tuple[bool, bool, bool]  # whether header n, m, aux must be 0 (docs/protocol.md §4.1: unused → 0)
    parse: Callable[[IngestMessage, tuple, Sequence[Any], Limits], None]
    flags_ok: int  # the flag bits this type may set (INGEST_FLAGS_ALLOWED)


def _kind(t: MsgType, n_frames: int, zero: tuple[bool, bool, bool], parse: Callable) -> _Kind:
    return _Kind(type=t, n_frames=n_frames, zero=zero, parse=parse, flags_ok=int(INGEST_FLAGS_ALLOWED[t]))


#: the dispatch table of :func:`parse_body`, keyed by the plain-int message type
_KINDS = {
    int(k.type): k
    for k in (
        _kind(MsgType.SPIKES, 3, (False, True, True), _parse_spikes),
        _kind(MsgType.TICK, 1, (True, True, True), _parse_tick),
        _kind(MsgType.COUNTS, 2, (False, False, False), _parse_binned),
        _kind(MsgType.KINEMATICS, 2, (False, False, True), _parse_binned),
        _kind(MsgType.RESET, 1, (True, True, True), _parse_reset),
        _kind(MsgType.PING, 1, (True, True, True), _parse_ping),
    )
}


# ---------------------------------------------------------------------------- output messages
@dataclass(frozen=True, slots=True)
class Prediction:
    """One decoded bin, as published.  Times ``t_*_ns`` are the daemon's CLOCK_MONOTONIC in ns."""

    bin: int  # bin index k: the bin [k·Δ, (k+1)·Δ) of the acquisition clock
    bin_start_ns: int
    bin_end_ns: int
    velocity: np.ndarray  # (D,) float32
    model_version: str
    flags: int
    epoch: int  # stream number (increments at every stream start)
    generation: int  # decoder number (increments at every swap)
    t_recv_ns: int  # the bin-closing message left the socket (or: the stall deadline fired)
    t_close_ns: int  # the bin's counts were final
    t_infer_ns: int  # decoder.step returned
    t_publish_ns: int  # just before the send call
    n_spikes: int  # spikes counted into this bin (saturates at 2³²−1)


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a PING: ``token`` and ``source`` echoed, plus the daemon's status."""

    token: int
    source: int
    seq: int
    status: dict


def encode_prediction(
    *,
    bin: int,
    bin_ns: int,
    velocity_bytes: bytes,
    n_outputs: int,
    model_version: bytes,
    flags: int,
    epoch: int,
    generation: int,
    t_recv_ns: int,
    t_close_ns: int,
    t_infer_ns: int,
    t_publish_ns: int,
    n_spikes: int,
) -> list[bytes]:
    """The PREDICTION frames (the daemon's hot path calls this once per bin)."""
    start = bin * bin_ns
    hdr = PREDICTION_HEADER.pack(
        MAGIC,
        PROTOCOL_VERSION,
        MsgType.PREDICTION,
        flags,
        n_outputs,
        bin,
        start,
        start + bin_ns,
        epoch & 0xFFFFFFFF,
        generation & 0xFFFFFFFF,
        t_recv_ns,
        t_close_ns,
        t_infer_ns,
        t_publish_ns,
        min(n_spikes, 0xFFFFFFFF),
        0,
    )
    return [hdr, velocity_bytes, model_version]


def encode_pong(*, token: int, source: int, seq: int, status: dict) -> list[bytes]:
    """The PONG frames: the ingest header layout echoing the PING's ``token``, then ``status`` as JSON."""
    hdr = _hdr(MsgType.PONG, source=source, seq=seq, time=token)
    return [hdr, json.dumps(status, sort_keys=True, default=str).encode()]


#: the prefix a SUB socket subscribes to for predictions only (``b""`` for everything)
PREDICTION_TOPIC = MAGIC + struct.pack("<HH", PROTOCOL_VERSION, MsgType.PREDICTION)
PONG_TOPIC = MAGIC + struct.pack("<HH", PROTOCOL_VERSION, MsgType.PONG)


def parse_output(frames: Sequence[bytes | memoryview]) -> Prediction | Pong:
    """Frames received on the PUB stream → :class:`Prediction` or :class:`Pong` (or ProtocolError)."""
    if not frames or len(frames[0]) < 8:
        raise ProtocolError("header_size", "output message too short")
    head = bytes(frames[0][:8])
    if head[:4] != MAGIC:
        raise ProtocolError("magic", repr(head[:4]))
    version, mtype = struct.unpack("<HH", head[4:8])
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {version}")
    if mtype == MsgType.PREDICTION:
        if len(frames) != 3 or len(frames[0]) != PREDICTION_HEADER.size:
            raise ProtocolError("frames", "PREDICTION is [88-byte header, velocity, version]")
        (_, _, _, flags, d, k, start, end, epoch, gen, t_recv, t_close, t_infer, t_pub, n_spikes, _) = (
            PREDICTION_HEADER.unpack(frames[0])
        )
        if len(frames[1]) != 4 * d:
            raise ProtocolError("payload_size", f"velocity {len(frames[1])} B for D={d}")
        vel = np.frombuffer(frames[1], dtype=VELOCITY_DTYPE).copy()
        return Prediction(
            bin=k,
            bin_start_ns=start,
            bin_end_ns=end,
            velocity=vel,
            model_version=bytes(frames[2]).decode("utf-8", "replace"),
            flags=flags,
            epoch=epoch,
            generation=gen,
            t_recv_ns=t_recv,
            t_close_ns=t_close,
            t_infer_ns=t_infer,
            t_publish_ns=t_pub,
            n_spikes=n_spikes,
        )
    if mtype == MsgType.PONG:
        if len(frames) != 2 or len(frames[0]) != INGEST_HEADER.size:
            raise ProtocolError("frames", "PONG is [48-byte header, status JSON]")
        h = INGEST_HEADER.unpack(frames[0])
        try:
            status = json.loads(bytes(frames[1]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError("payload_size", f"PONG status is not JSON ({exc})") from None
        return Pong(token=h[6], source=h[3], seq=h[5], status=status)
    raise ProtocolError("msg_type", f"unknown output message type {mtype}")
