"""Redis streams, BRAND-style (``redis`` client): read spikes / counts with XREAD, write predictions with XADD.

As in BRAND, arrays travel as raw little-endian bytes in stream entry fields and scalars as
ASCII decimal.  The field layout (docs/adapters.md has the same table):

Ingest, ``redis:KEY`` — one entry is one message, its kind told by its fields:

=============  ====================================================================  ===========
fields         meaning                                                               native msg
=============  ====================================================================  ===========
``channels``,  n events: channel ids (``<u2`` bytes) and times in ns (``<i8`` bytes),  SPIKES
``times_ns``   non-decreasing; optional ``clock_ns``: every event before it is sent
``counts``,    consecutive bins from bin index ``first_bin``: ``<u2`` bytes, row-major  COUNTS
``first_bin``  (n_bins × n_channels)
``clock_ns``   alone: the acquisition clock reached it                               TICK
``reset``      a new stream: start time in ns, or ``-1`` for "at the next time";      RESET
               optional ``free_run`` = 1
=============  ====================================================================  ===========

Optional on every entry: ``seq``, the writer's running message number; a jump counts the entries
in between as ``lost`` (an entry trimmed by ``MAXLEN`` before it was read is lost this way too).
An entry that fits none of the rows, has a field of the wrong size or an unparsable number is
dropped and counted (``fields``, ``payload_size``, ``number``).  Times are on the acquisition clock
(ns) — the writer's clock is the bin clock, as for a native rig.

Reading starts after the stream's last entry at the first connect (what was written before the
daemon started is history, not live data); option ``start=0`` reads the stream from its first
entry instead.  A lost connection is a ``disconnect``; the bridge reconnects and goes on after the
last entry it read (no RESET: the writer's stream continues, and ``seq`` shows what was lost).

Publish, ``redis:KEY`` — ``XADD KEY MAXLEN ~ maxlen *`` (option ``maxlen``, default 100000) with
fields ``bin``, ``epoch``, ``flags`` (ASCII), ``y`` (the decoded target, ``<f4`` bytes, D values),
``latency_ns`` (the daemon's ``t_publish − t_recv``), ``t_publish_ns`` (the daemon's
CLOCK_MONOTONIC) and ``model_version`` (UTF-8).

Options for both: ``host`` (default 127.0.0.1), ``port`` (6379), ``db`` (0).
"""

from __future__ import annotations

import numpy as np
import redis

from ..protocol import (
    CHANNEL_DTYPE,
    COUNT_DTYPE,
    TIME_DTYPE,
    Prediction,
    encode_counts,
    encode_reset,
    encode_spikes,
    encode_tick,
)
from .base import Disconnected, IngestAdapter, PublishAdapter, Unavailable, latency_ns

_GONE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, OSError)


class _BadEntry(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _client(spec, *, timeout_s: float) -> redis.Redis:
    return redis.Redis(
        host=spec.option("host", "127.0.0.1", str),
        port=spec.option("port", 6379, int),
        db=spec.option("db", 0, int),
        socket_connect_timeout=2.0,
        socket_timeout=timeout_s,
    )


def _int(fields: dict, name: str) -> int:
    try:
        v = int(fields[name.encode()])
    except (ValueError, TypeError):
        raise _BadEntry("number", f"field {name} is not an integer") from None
    if not -(1 << 63) <= v < (1 << 63):
        raise _BadEntry("number", f"field {name} is out of the 64-bit range")
    return v


def _array(fields: dict, name: str, dtype: np.dtype) -> np.ndarray:
    raw = fields[name.encode()]
    if len(raw) % dtype.itemsize:
        raise _BadEntry(
            "payload_size", f"field {name}: {len(raw)} bytes is not a whole number of {dtype.str}"
        )
    return np.frombuffer(raw, dtype=dtype)


class RedisIngest(IngestAdapter):
    """``redis:KEY`` (options ``host``, ``port``, ``db``, ``start``: ``$`` (default) or ``0``)."""

    kind = "redis"
    reset_on_reconnect = False
    BLOCK_MS = 50

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.key = self.spec.target
        self._r: redis.Redis | None = None
        self._last_id: bytes | None = None if self.spec.option("start", "$", str) == "$" else b"0-0"
        self._seq: int | None = None

    def _connect(self) -> None:
        r = _client(self.spec, timeout_s=5.0 + self.BLOCK_MS / 1e3)
        try:
            r.ping()
            if self._last_id is None:
                tail = r.xrevrange(self.key, count=1)
                self._last_id = tail[0][0] if tail else b"0-0"
        except _GONE as exc:
            r.close()
            raise Unavailable(
                f"redis at {self.spec.option('host', '127.0.0.1', str)}:"
                f"{self.spec.option('port', 6379, int)}: {exc}"
            ) from None
        self._r = r

    def _close_foreign(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None

    def _poll(self, timeout_s: float) -> None:
        try:
            resp = self._r.xread({self.key: self._last_id}, count=1024, block=max(1, int(timeout_s * 1000)))
        except _GONE as exc:
            raise Disconnected(f"redis: {exc}") from None
        for _key, entries in resp or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                self.stats.received += 1
                try:
                    self._forward(fields)
                except _BadEntry as exc:
                    self.stats.reject(exc.reason, detail=f"entry {entry_id.decode()}: {exc}")

    def _forward(self, fields: dict) -> None:
        if b"seq" in fields:
            seq = _int(fields, "seq")
            if self._seq is not None and seq > self._seq + 1:
                self.stats.lost += seq - self._seq - 1
            self._seq = seq
        src = self.source_id
        if b"reset" in fields:
            start = _int(fields, "reset")
            free = fields.get(b"free_run", b"0") == b"1" or self.free_run
            self.send(
                encode_reset(
                    source=src, seq=self.next_seq(), start=None if start < 0 else start, free_run=free
                )
            )
        elif b"channels" in fields or b"times_ns" in fields:
            if b"channels" not in fields or b"times_ns" not in fields:
                raise _BadEntry("fields", "SPIKES needs both 'channels' and 'times_ns'")
            ch, tm = _array(fields, "channels", CHANNEL_DTYPE), _array(fields, "times_ns", TIME_DTYPE)
            if ch.shape != tm.shape:
                raise _BadEntry("payload_size", f"{ch.size} channels but {tm.size} times")
            clock = _int(fields, "clock_ns") if b"clock_ns" in fields else None
            self.send(encode_spikes(source=src, seq=self.next_seq(), channels=ch, times=tm, clock=clock))
        elif b"counts" in fields:
            if b"first_bin" not in fields:
                raise _BadEntry("fields", "COUNTS needs 'first_bin'")
            c, first = _array(fields, "counts", COUNT_DTYPE), _int(fields, "first_bin")
            if c.size == 0 or c.size % self.n_channels:
                raise _BadEntry(
                    "payload_size", f"{c.size} counts is not a whole number of {self.n_channels}-channel bins"
                )
            self.send(
                encode_counts(
                    source=src,
                    seq=self.next_seq(),
                    first=first,
                    counts=c.reshape(-1, self.n_channels),
                    bin_ns=self.bin_ns,
                )
            )
        elif b"clock_ns" in fields:
            clock = _int(fields, "clock_ns")
            self.send(encode_tick(source=src, seq=self.next_seq(), clock=clock))
        else:
            names = ", ".join(sorted(k.decode("utf-8", "replace") for k in fields)) or "none"
            raise _BadEntry("fields", f"no known message fields (got {names})")


class RedisPublish(PublishAdapter):
    """``redis:KEY`` (options ``host``, ``port``, ``db``, ``maxlen``)."""

    kind = "redis"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.key = self.spec.target
        self.maxlen = self.spec.option("maxlen", 100_000, int)
        self._r: redis.Redis | None = None

    def _connect(self) -> None:
        r = _client(self.spec, timeout_s=5.0)
        try:
            r.ping()
        except _GONE as exc:
            r.close()
            raise Unavailable(f"redis: {exc}") from None
        self._r = r

    def _close_foreign(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None

    def emit(self, p: Prediction) -> None:
        fields = {
            "bin": p.bin,
            "epoch": p.epoch,
            "flags": p.flags,
            "y": p.velocity.astype("<f4").tobytes(),
            "latency_ns": latency_ns(p),
            "t_publish_ns": p.t_publish_ns,
            "model_version": p.model_version,
        }
        try:
            self._r.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        except _GONE as exc:
            raise Disconnected(f"redis: {exc}") from None
