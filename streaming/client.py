"""A small reference client for rig integrators: send events, receive predictions.

Copy this file (it needs only numpy, pyzmq and :mod:`streaming.protocol`), or read
``docs/protocol.md`` and write the same in another language.

    from streaming.client import RigClient, PredictionSubscriber, wait_for_daemon

    rig = RigClient(endpoint="tcp://127.0.0.1:5555", source_id=1)            # PUSH → daemon's PULL
    sub = PredictionSubscriber(endpoint="tcp://127.0.0.1:5556")              # SUB ← daemon's PUB
    status = wait_for_daemon(rig, sub)          # PING/PONG: the daemon is up and our SUB is live
    rig.send_reset(start=0)                     # a new stream starting at t = 0
    rig.send_spikes(channels=[3, 17], times=[1_250_000, 4_000_000], clock=5_000_000)   # ns
    rig.send_tick(20_000_000)                   # clock reached 20 ms: bin [0, 20 ms) closes
    p = sub.recv(timeout=1.0)                   # Prediction(bin=0, velocity=array([...]), ...)

Threading: a ZeroMQ socket belongs to one thread.  Create each client in the thread that uses it
(they share the process-wide ``zmq.Context.instance()`` unless given a context).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zmq

from .protocol import (
    PREDICTION_TOPIC,
    Pong,
    Prediction,
    encode_counts,
    encode_kinematics,
    encode_ping,
    encode_reset,
    encode_spikes,
    encode_tick,
    parse_output,
)


class RigClient:
    """The sending side: one PUSH socket, one source id, one sequence counter over all its messages.

    Args:
        endpoint: the daemon's ingest endpoint (``rpnt serve --ingest``).
        source_id: this source's id (u32); several rigs/processes use distinct ids.
        rate_hz: 0 → times are integer nanoseconds; > 0 → integer sample indices at this rate.
        first_seq: the first sequence number (0; a source that restarts at 0 is read as a restart).
        context: a zmq.Context (default: the process-wide instance).
        sndhwm: messages queued locally while the daemon is away before ``send`` blocks.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        source_id: int = 0,
        rate_hz: int = 0,
        first_seq: int = 0,
        context: zmq.Context | None = None,
        sndhwm: int = 100_000,
    ) -> None:
        self.source_id = int(source_id)
        self.rate_hz = int(rate_hz)
        self.seq = int(first_seq)
        self._sock = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        self._sock.connect(endpoint)

    def _send(self, encode: Callable[..., list[bytes]], **fields: Any) -> int:
        """Encode one message with this source's id and next sequence number, send it; its number."""
        seq = self.seq
        self.seq += 1
        self._sock.send_multipart(encode(source=self.source_id, seq=seq, **fields))
        return seq

    def send_frames(self, frames: list[bytes], *, flags: int = 0) -> None:
        """Send raw frames (no sequence number is consumed: the frames carry their own)."""
        self._sock.send_multipart(frames, flags=flags)

    def send_spikes(
        self,
        channels: Sequence[int] | np.ndarray,
        times: Sequence[int] | np.ndarray,
        *,
        clock: int | None = None,
    ) -> int:
        """Events sorted by time (non-decreasing); ``clock``: every event before it has been sent."""
        return self._send(encode_spikes, channels=channels, times=times, clock=clock, rate_hz=self.rate_hz)

    def send_tick(self, clock: int) -> int:
        """Heartbeat: the acquisition clock reached ``clock`` (closes bins that end at or before it)."""
        return self._send(encode_tick, clock=clock, rate_hz=self.rate_hz)

    def send_counts(
        self, first: int, counts: np.ndarray, *, time_is_clock: bool = False, bin_ns: int = 0
    ) -> int:
        """Already-binned counts (n_bins, n_channels) for bins ``first …`` (a bin index, or a time)."""
        return self._send(
            encode_counts,
            first=first,
            counts=counts,
            time_is_clock=time_is_clock,
            rate_hz=self.rate_hz,
            bin_ns=bin_ns,
        )

    def send_kinematics(self, first: int, values: np.ndarray, *, time_is_clock: bool = False) -> int:
        """Behaviour (n_bins, D) (or (D,)) for bins ``first …``: what calibration learns from."""
        return self._send(
            encode_kinematics, first=first, values=values, time_is_clock=time_is_clock, rate_hz=self.rate_hz
        )

    def send_reset(self, start: int | None = None, *, free_run: bool = False) -> int:
        """Start a new stream (at ``start``, or at the next reported time).  ``free_run``: no
        wall-clock deadline for this stream (replaying faster than real time)."""
        return self._send(encode_reset, start=start, free_run=free_run, rate_hz=self.rate_hz)

    def ping(self, token: int) -> int:
        """PING with ``token``: the daemon answers with a PONG echoing it (:func:`wait_for_daemon`)."""
        return self._send(encode_ping, token=token)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "RigClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PredictionSubscriber:
    """The receiving side: a SUB socket on the daemon's publish endpoint.

    ``recv`` returns a :class:`~streaming.protocol.Prediction` or a :class:`~streaming.protocol.Pong`
    (``None`` on timeout).  ZeroMQ drops messages for a subscriber that falls ``rcvhwm`` behind —
    the daemon never waits for anyone — so read promptly (a thread of its own, or a poll loop).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        context: zmq.Context | None = None,
        rcvhwm: int = 100_000,
        predictions_only: bool = False,
    ) -> None:
        self._sock = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        self._sock.setsockopt(zmq.SUBSCRIBE, PREDICTION_TOPIC if predictions_only else b"")
        self._sock.connect(endpoint)

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def recv(self, timeout: float | None = None) -> Prediction | Pong | None:
        """The next message (``timeout`` seconds; None = wait forever) or None."""
        if timeout is not None and not self._sock.poll(int(max(0.0, timeout) * 1000)):
            return None
        return parse_output(self._sock.recv_multipart())

    def recv_frames_nowait(self) -> list[bytes] | None:
        try:
            return self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def predictions(self, *, timeout: float = 1.0) -> Iterator[Prediction]:
        """Predictions until ``timeout`` seconds pass without one."""
        while True:
            m = self.recv(timeout)
            if m is None:
                return
            if isinstance(m, Prediction):
                yield m

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "PredictionSubscriber":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_daemon(
    rig: RigClient, sub: PredictionSubscriber, *, timeout: float = 10.0, interval: float = 0.05
) -> dict:
    """PING until our own PONG comes back on ``sub``; returns the daemon's status.

    This is also the cure for ZeroMQ's "slow joiner": a SUB only receives what is published after
    its subscription reached the publisher, and a PONG that arrives proves it has.  Raises
    ``TimeoutError`` if no PONG arrives within ``timeout`` seconds."""
    token = int.from_bytes(os.urandom(7), "little")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rig.ping(token)
        t_next = time.monotonic() + interval
        while (left := t_next - time.monotonic()) > 0:
            m = sub.recv(left)
            if isinstance(m, Pong) and m.token == token and m.source == rig.source_id:
                return m.status
    raise TimeoutError(
        f"no PONG from the daemon within {timeout} s (is `rpnt serve` running on these endpoints?)"
    )
