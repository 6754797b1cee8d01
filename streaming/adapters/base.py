"""What every adapter shares: the bridge threads, their counters, and the spec they were built from.

An **ingest adapter** is a bridge, not a second decode loop: it reads a foreign source (an LSL
inlet, a Redis stream, the Open Ephys ZMQ Interface) in a thread of its own and sends native
protocol messages (``RESET`` / ``SPIKES`` / ``TICK`` / ``COUNTS``, with its own source id and one
sequence counter) into the daemon's ingest socket through a :class:`~streaming.client.RigClient`.
The daemon's binner and engine therefore see exactly what a native rig would have sent for the
same data — a replay through an adapter decodes bit for bit like the native replay — and every
native check (time order, channel range, sequence accounting, rejects by reason) applies to what
an adapter forwards, under the adapter's source id.

A **publish adapter** subscribes to the daemon's PUB socket (predictions only) and republishes
every prediction (an LSL outlet, ``XADD`` to a Redis stream).

Counters (:meth:`AdapterStats.as_dict`, in the daemon's snapshot under ``adapters``):

- ``received``: foreign messages (LSL samples, Redis entries, ZMQ messages) read;
- ``forwarded``: native messages sent to the daemon (ingest) / predictions republished (publish);
- ``rejected``: foreign messages dropped by the adapter, by reason (malformed, out of range, …);
  what it forwards and the daemon rejects is counted by the daemon under the adapter's source id;
- ``lost``: foreign messages known to be missing (a sequence gap in the foreign stream, where its
  format numbers messages; a prediction bin the publish side never saw);
- ``disconnects`` / ``reconnects``: the foreign side went away / came back (the first connection
  is not a reconnect); ``connected``: whether it is connected now.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import zmq

from ..client import RigClient
from ..protocol import PREDICTION_TOPIC, Prediction, ProtocolError, parse_output
from ..threads import LoopThread

log = logging.getLogger("rpnt.adapters")

#: how long a bridge waits before trying an unavailable foreign source again
RETRY_S = 0.5


class AdapterError(ValueError):
    """An adapter spec or option that cannot work; the message names it (one line)."""


class Unavailable(RuntimeError):
    """The foreign source is not there (yet): the bridge retries after :data:`RETRY_S`."""


class Disconnected(RuntimeError):
    """The foreign source went away while connected: counted, then the bridge reconnects."""


@dataclass(frozen=True, kw_only=True)
class AdapterSpec:
    """``KIND:TARGET[?key=value&...]`` parsed (``lsl:rig-spikes``, ``redis:rpnt:spikes?port=6380``).

    ``text`` is the spec as given (it names the adapter in status and errors)."""

    text: str
    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)

    def option(self, name: str, default: Any, cast: type) -> Any:
        """Option ``name`` cast to ``cast`` (bools: 1/0, true/false, yes/no), or ``default``."""
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            if cast is bool:
                low = raw.lower()
                if low not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                return low in ("1", "true", "yes")
            return cast(raw)
        except ValueError:
            raise AdapterError(f"{self.text}: option {name}={raw} is not a valid {cast.__name__}") from None

    @property
    def default_source_id(self) -> int:
        """A stable source id for this spec (so restarts keep the daemon's per-source accounting)."""
        return zlib.crc32(self.text.encode()) & 0x7FFFFFFF


class AdapterStats:
    """The counters of one adapter (written by its thread, copied by :meth:`as_dict` from any thread)."""

    def __init__(self, *, spec: AdapterSpec, direction: str) -> None:
        self.spec = spec
        self.direction = direction
        self.connected = False
        self.received = 0
        self.forwarded = 0
        self.lost = 0
        self.disconnects = 0
        self.reconnects = 0
        self.rejected: dict[str, int] = {}
        self.last_error = ""
        self.extra: dict[str, Any] = {}

    def reject(self, reason: str, n: int = 1, detail: str = "") -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        if detail:
            self.last_error = f"{reason}: {detail}"

    def as_dict(self) -> dict:
        return {
            "kind": self.spec.kind,
            "direction": self.direction,
            "target": self.spec.target,
            "connected": self.connected,
            "received": self.received,
            "forwarded": self.forwarded,
            "rejected": dict(self.rejected),
            "lost": self.lost,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
            **dict(self.extra),
        }


class _Bridge(LoopThread):
    """A thread that keeps one foreign connection alive: connect (retrying while unavailable), poll
    until disconnected or stopped, count disconnects and reconnects.  ``start()`` starts it;
    ``stop()`` / ``join()`` as :class:`~streaming.threads.LoopThread`."""

    direction = ""
    #: send a native RESET (a new stream) after a reconnect too, not only after the first connect
    reset_on_reconnect = True

    def __init__(self, *, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stats = AdapterStats(spec=spec, direction=self.direction)
        self._ever_connected = False

    def start(self) -> _Bridge:
        self._start_thread(self._run, name=f"rpnt-adapter-{self.spec.kind}", what=f"adapter {self.spec.text}")
        return self

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self._open_local()
            while not self._stop.is_set():
                if not self.stats.connected and not self._try_connect():
                    self._idle()
                    self._stop.wait(RETRY_S)
                    continue
                try:
                    self._poll(0.05)
                except Disconnected as exc:
                    self._lost_connection(str(exc))
        except Exception as exc:
            self.stats.last_error = f"internal: {type(exc).__name__}: {exc}"
            log.exception("adapter %s stopped on an unexpected error", self.spec.text)
        finally:
            self.stats.connected = False
            self._close_foreign()
            self._close_local()

    def _try_connect(self) -> bool:
        try:
            self._connect()
        except Unavailable as exc:
            self.stats.last_error = str(exc)
            return False
        self.stats.connected = True
        if self._ever_connected:
            self.stats.reconnects += 1
        if not self._ever_connected or self.reset_on_reconnect:
            self._on_stream_start()
        self._ever_connected = True
        log.info("adapter %s connected", self.spec.text)
        return True

    def _lost_connection(self, why: str) -> None:
        self.stats.connected = False
        self.stats.disconnects += 1
        self.stats.last_error = why
        log.warning("adapter %s disconnected: %s", self.spec.text, why)
        self._close_foreign()

    # ------------------------------------------------------------------ per adapter
    def _open_local(self) -> None:
        """Open the daemon-side socket (in the bridge thread: a ZeroMQ socket belongs to one thread)."""

    def _close_local(self) -> None:
        """Close the daemon-side socket."""

    def _connect(self) -> None:
        """Connect to the foreign side; raise :class:`Unavailable` when it is not there (yet)."""
        raise NotImplementedError

    def _on_stream_start(self) -> None:
        """Runs after the first connect (and after every reconnect when ``reset_on_reconnect``)."""

    def _poll(self, timeout_s: float) -> None:
        """Move what arrived within ``timeout_s``; raise :class:`Disconnected` when the foreign side is gone."""
        raise NotImplementedError

    def _close_foreign(self) -> None:
        """Drop the foreign connection (idempotent)."""

    def _idle(self) -> None:
        """Runs between connection attempts."""


class IngestAdapter(_Bridge):
    """Foreign source → native messages into the daemon's ingest socket.

    Args:
        spec: the parsed spec.
        ingest: the daemon's ingest endpoint (what a native rig connects to).
        bin_ns: the daemon's bin width; n_channels: its model's channel count.
    Spec options every ingest adapter takes: ``source_id`` (default: a hash of the spec text),
    ``free_run`` (0/1, default 0: the native RESET's FREE_RUN flag — no wall-clock deadline, for
    replays faster than real time).
    """

    direction = "ingest"

    def __init__(self, *, spec: AdapterSpec, ingest: str, bin_ns: int, n_channels: int) -> None:
        super().__init__(spec=spec)
        self.ingest = ingest
        self.bin_ns = int(bin_ns)
        self.n_channels = int(n_channels)
        self.source_id = spec.option("source_id", spec.default_source_id, int)
        self.free_run = spec.option("free_run", False, bool)
        self.stats.extra["source_id"] = self.source_id
        self.rig: RigClient | None = None
        self._reset_due = False

    def _open_local(self) -> None:
        self.rig = RigClient(endpoint=self.ingest, source_id=self.source_id)

    def _close_local(self) -> None:
        if self.rig is not None:
            self.rig.close()

    def _on_stream_start(self) -> None:
        """The next message forwarded starts a new stream on the daemon (a RESET goes first, sent
        then and not now: connecting must not cut a stream another source is sending)."""
        self._reset_due = True

    def next_seq(self) -> int:
        """The sequence number for the next native message; the RESET :meth:`_on_stream_start` asked
        for is sent first (it takes a number of its own)."""
        if self._reset_due:
            self._reset_due = False
            self.rig.send_reset(free_run=self.free_run)
            self.stats.forwarded += 1
        return self.rig.seq

    def send(self, frames: list[bytes]) -> None:
        """One native message, built with ``seq=self.next_seq()`` (see :mod:`streaming.protocol`)."""
        self.rig.send_frames(frames)
        self.rig.seq += 1
        self.stats.forwarded += 1


class PublishAdapter(_Bridge):
    """The daemon's predictions → a foreign sink.

    Args:
        spec: the parsed spec.
        publish: the daemon's PUB endpoint.
        n_outputs: the model's output dims D; bin_ns: the daemon's bin width.
    """

    direction = "publish"
    reset_on_reconnect = False

    def __init__(self, *, spec: AdapterSpec, publish: str, n_outputs: int, bin_ns: int) -> None:
        super().__init__(spec=spec)
        self.publish = publish
        self.n_outputs = int(n_outputs)
        self.bin_ns = int(bin_ns)
        self._sub: zmq.Socket | None = None
        self._last: tuple[int, int] | None = None  # (epoch, bin) of the last prediction seen

    def _open_local(self) -> None:
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, PREDICTION_TOPIC)
        self._sub.connect(self.publish)

    def _close_local(self) -> None:
        if self._sub is not None:
            self._sub.close()

    def _poll(self, timeout_s: float) -> None:
        if not self._sub.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                p = parse_output(frames)
            except ProtocolError as exc:
                self.stats.reject(exc.reason, detail=exc.detail)
                continue
            if isinstance(p, Prediction):
                self._take(p)

    def _take(self, p: Prediction) -> None:
        self.stats.received += 1
        if self._last is not None and self._last[0] == p.epoch and p.bin > self._last[1] + 1:
            self.stats.lost += p.bin - self._last[1] - 1  # the SUB socket dropped some at its high-water mark
        self._last = (p.epoch, p.bin)
        self.emit(p)  # Disconnected propagates: this prediction is counted lost by the caller
        self.stats.forwarded += 1

    def emit(self, p: Prediction) -> None:
        """Republish one prediction; raise :class:`Disconnected` when the sink is gone."""
        raise NotImplementedError

    def _lost_connection(self, why: str) -> None:
        self.stats.lost += 1  # the prediction that could not be written
        super()._lost_connection(why)

    def _idle(self) -> None:
        """While the sink is away, predictions still arrive: drop them (counted lost), never
        republish them late."""
        while True:
            try:
                frames = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames and frames[0][:8] == PREDICTION_TOPIC:
                self.stats.received += 1
                self.stats.lost += 1
        self._last = None


def latency_ns(p: Prediction) -> int:
    """The daemon's own latency for one prediction: the bin-closing message left the socket → the
    prediction was about to be sent (``t_publish − t_recv``, ns; CLOCK_MONOTONIC of the daemon)."""
    return int(p.t_publish_ns - p.t_recv_ns)
