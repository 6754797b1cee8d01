"""Replay a recorded session through a daemon as spike events, and collect what comes back.

Binned recordings → events (deterministic, documented in ``docs/protocol.md``)
-------------------------------------------------------------------------------
A bin ``k`` (``[k·Δ, (k+1)·Δ)`` in ns) in which channel ``c`` counted ``m > 0`` spikes becomes ``m``
events on channel ``c`` at the midpoints of ``m`` equal slices of the bin::

    t_j = k·Δ + ⌊(2j + 1)·Δ / (2m)⌋        j = 0 … m−1

(integer arithmetic; every ``t_j`` lies inside the bin).  A bin's events are sent sorted by time,
ties by channel.  Binning them again at the same Δ gives back the recorded counts exactly
(:func:`bin_events`), which is what makes "the daemon rebuilds the recorded counts" a test.

What is sent
------------
After a PING/PONG handshake (which also checks the daemon's bin width and channel count), a
RESET starting the stream at bin 0 (``free_run`` when not real-time), then per bin ``k``: one
SPIKES packet with bin ``k``'s events and ``clock = (k+1)·Δ`` — the *bin-closing packet* — and,
unless disabled, one KINEMATICS message with the recorded velocity of bin ``k``.  At the end, a
PING/PONG (so everything sent — the last kinematics too — has been handled when ``run_replay``
returns) and a RESET that ends the stream (so a real-time daemon does not keep closing empty,
stalled bins).

Pacing: ``realtime`` sends bin ``k``'s packet when the replay clock reaches the end of bin ``k``
(``start + (k+1)·Δ``, i.e. as a rig would); ``fast`` sends as fast as the daemon decodes, with at
most ``window`` bins in flight (so no prediction is dropped at a subscriber's high-water mark).

One thread does everything (send on schedule, receive in between, via one poll), so the send
and receive timestamps come from one clock (``time.monotonic_ns``, CLOCK_MONOTONIC on Linux — the
daemon's stage stamps use the same clock, comparable when it runs on the same host).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import zmq

from .client import PredictionSubscriber, RigClient, wait_for_daemon
from .protocol import CHANNEL_DTYPE, TIME_DTYPE, Prediction, encode_kinematics, encode_spikes, parse_output

_now = time.monotonic_ns


class ReplayError(RuntimeError):
    """The daemon does not match the recording (bin width, channels) or did not answer."""


# ---------------------------------------------------------------------------- counts ⇄ events
def events_from_counts(counts: np.ndarray, bin_ns: int, *, first_bin: int = 0) -> tuple[list, list]:
    """Counts (T, N) → per bin, (channels (n_k,) uint16, times (n_k,) int64): the module's placement rule."""
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts: expected (T, N), got {c.shape}")
    if c.size and (c.min() < 0 or c.max() > np.iinfo(np.int32).max):
        raise ValueError("counts: must be non-negative integers")
    T, N = c.shape
    if N > 65_536:
        raise ValueError(f"counts: {N} channels exceed the protocol's uint16 channel ids")
    flat = c.reshape(-1).astype(np.int64)  # (T·N,)
    total = int(flat.sum())
    idx = np.repeat(np.arange(T * N, dtype=np.int64), flat)  # (E,) which (bin, channel) each event is
    starts = np.cumsum(flat) - flat  # (T·N,) first event of each (bin, channel)
    j = np.arange(total, dtype=np.int64) - np.repeat(starts, flat)  # (E,) index within its (bin, channel)
    m = flat[idx]  # (E,)
    b = idx // N
    chan = (idx % N).astype(CHANNEL_DTYPE)
    times = (b + first_bin) * bin_ns + ((2 * j + 1) * bin_ns) // (2 * m)  # (E,)
    order = np.lexsort((chan, times))  # by time, ties by channel
    chan, times = chan[order], times.astype(TIME_DTYPE)[order]
    per_bin = c.sum(axis=1).astype(np.int64)  # (T,)
    cuts = np.cumsum(per_bin)[:-1]
    return np.split(chan, cuts), np.split(times, cuts)


def bin_events(
    channels: np.ndarray, times: np.ndarray, *, bin_ns: int, n_channels: int, first_bin: int, n_bins: int
) -> np.ndarray:
    """Events → counts (n_bins, n_channels) for bins ``first_bin …`` (events outside are ignored)."""
    b = np.asarray(times, dtype=np.int64) // bin_ns - first_bin
    ok = (b >= 0) & (b < n_bins)
    out = np.zeros((n_bins, n_channels), dtype=np.int64)
    np.add.at(out, (b[ok], np.asarray(channels, dtype=np.int64)[ok]), 1)
    return out


# ---------------------------------------------------------------------------- the replay
def _ms(ns, *, unit: bool = True) -> str:
    """A bin width in ns as people write it: ``20 ms`` (``?`` when the daemon did not say)."""
    if not isinstance(ns, (int, float)):
        return "?"
    return f"{ns / 1e6:g}" + (" ms" if unit else "")


@dataclass
class ReplayResult:
    """What came back, per bin of the replayed range (T bins; NaN / −1 where nothing arrived)."""

    bin_ns: int
    pace: str
    velocity: np.ndarray  # (T, D) float32 predictions
    received: np.ndarray  # (T,) bool
    flags: np.ndarray  # (T,) int64
    n_spikes: np.ndarray  # (T,) int64 spikes the daemon counted into the bin
    t_send: np.ndarray  # (T,) client clock: just before the bin-closing packet was sent
    t_client_recv: np.ndarray  # (T,) client clock: the prediction left our SUB socket
    t_daemon: np.ndarray  # (T, 4) daemon clock: recv, close, infer, publish
    model_versions: list[str]
    generations: list[int]
    status: dict  # the daemon's status from the handshake
    wall_s: float
    events_sent: int = 0
    extra_predictions: int = 0  # predictions of other streams / bins that were ignored
    notes: list[str] = field(default_factory=list)
    target: str = "velocity"  # what the daemon's model decodes (its status)
    recorded: np.ndarray | None = None  # (T, D) the recording's series of that target, if it has one
    generation: np.ndarray | None = None  # (T,) int64 decoder generation of each bin's prediction (−1: none)
    epoch: int = 0  # the daemon's stream (epoch) the replay ran as
    versions_by_generation: dict[int, str] = field(default_factory=dict)

    @property
    def n_bins(self) -> int:
        return int(self.received.shape[0])

    @property
    def bins_lost(self) -> int:
        return int((~self.received).sum())


def run_replay(
    *,
    counts: np.ndarray,
    bin_ns: int,
    ingest: str,
    publish: str,
    labels: Mapping[str, np.ndarray] | None = None,
    realtime: bool = True,
    send_kinematics: bool = True,
    source_id: int = 0x52504C59,
    window: int = 16,
    drain_timeout_s: float = 5.0,
    handshake_timeout_s: float = 30.0,
    context: zmq.Context | None = None,
    progress: bool = False,
) -> ReplayResult:
    """Replay ``counts`` as events to a running daemon and collect its predictions (module docstring).

    Args:
        counts: (T, N) spike counts per bin; N must be the daemon's channel count.
        bin_ns: the recording's bin width; must be the daemon's.
        ingest: the daemon's ingest endpoint (PUSH → its PULL).
        publish: the daemon's publish endpoint (its PUB → our SUB).
        labels: the recording's behaviour series by name, (T, D_k) each.  The one the daemon's model
            decodes (its status's ``target``) becomes ``res.recorded`` and is sent as KINEMATICS
            when ``send_kinematics`` and its width is the daemon's ``n_kinematics``.
        realtime: pace bins by the clock (else as fast as the daemon decodes, ``window`` in flight).
        source_id: this replay's source id on the wire.
        drain_timeout_s: how long to wait for predictions (in fast mode per bin, and at the end).
        handshake_timeout_s: how long to wait for the daemon's first PONG.
        context: a zmq.Context (default: the process-wide instance).
        progress: print a line every 1000 bins.

    Returns:
        The :class:`ReplayResult`: per bin what came back (NaN / −1 where nothing did).

    Raises:
        ReplayError: the daemon's bin width or channel count is not the recording's.
        TimeoutError: no PONG within ``handshake_timeout_s``.
    """
    counts = np.asarray(counts)
    T, N = counts.shape
    for name, series in (labels or {}).items():
        if series.shape[0] != T:
            raise ValueError(f"{name}: {series.shape[0]} bins, counts have {T}")
    chans, times = events_from_counts(counts, bin_ns)
    ctx = context or zmq.Context.instance()
    rig = RigClient(endpoint=ingest, source_id=source_id, context=ctx)
    sub = PredictionSubscriber(endpoint=publish, context=ctx, rcvhwm=max(100_000, 2 * T))
    try:
        status = wait_for_daemon(rig, sub, timeout=handshake_timeout_s)
        _check_daemon(status, bin_ns=bin_ns, n_channels=N)
        res, kinematics = _new_result(
            status, n_bins=T, bin_ns=bin_ns, labels=labels, realtime=realtime, send_kinematics=send_kinematics
        )
        _ReplayLoop(
            rig=rig,
            sub=sub,
            res=res,
            events=(chans, times),
            kinematics=kinematics,
            realtime=realtime,
            window=window,
            drain_timeout_s=drain_timeout_s,
            progress=progress,
        ).run()
        return res
    finally:
        rig.close()
        sub.close()


def _check_daemon(status: dict, *, bin_ns: int, n_channels: int) -> None:
    """:class:`ReplayError` unless the daemon (its PONG ``status``) bins at ``bin_ns`` over ``n_channels``."""
    if int(status.get("bin_ns", -1)) != int(bin_ns):
        raise ReplayError(
            f"the daemon bins at {_ms(status.get('bin_ns'))}, this replay at {_ms(bin_ns)} "
            f"(replay with --bin-ms {_ms(status.get('bin_ns'), unit=False)}, or start the daemon "
            f"with --bin-ms {_ms(bin_ns, unit=False)})"
        )
    if int(status.get("n_channels", -1)) != n_channels:
        raise ReplayError(
            f"the daemon's model takes {status.get('n_channels')} channels, the recording has {n_channels}"
        )


def _new_result(
    status: dict,
    *,
    n_bins: int,
    bin_ns: int,
    labels: Mapping[str, np.ndarray] | None,
    realtime: bool,
    send_kinematics: bool,
) -> tuple[ReplayResult, np.ndarray | None]:
    """An empty :class:`ReplayResult` for the daemon's ``status``, and the (T, D) kinematics to send
    (None: none; the result's notes say why when the recording has some)."""
    T = n_bins
    target = str(status.get("target", "velocity"))
    recorded = (labels or {}).get(target)
    D = int(status.get("n_outputs", recorded.shape[1] if recorded is not None else 1))
    res = ReplayResult(
        bin_ns=int(bin_ns),
        pace="realtime" if realtime else "fast",
        velocity=np.full((T, D), np.nan, dtype=np.float32),
        received=np.zeros(T, bool),
        flags=np.zeros(T, np.int64),
        n_spikes=np.full(T, -1, np.int64),
        t_send=np.zeros(T, np.int64),
        t_client_recv=np.zeros(T, np.int64),
        t_daemon=np.zeros((T, 4), np.int64),
        model_versions=[],
        generations=[],
        status=status,
        wall_s=0.0,
        target=target,
        recorded=recorded,
        generation=np.full(T, -1, np.int64),
        epoch=int(status.get("epoch", 0)) + 1,  # the replay's RESET starts the next stream
    )
    if labels and recorded is None:
        res.notes.append(
            f"the daemon decodes {target}, which the recording does not have "
            f"(it has {', '.join(labels)}): nothing to score against"
        )
    if not send_kinematics or recorded is None:
        return res, None
    if int(status.get("n_kinematics", -1)) != recorded.shape[1]:
        res.notes.append(f"kinematics not sent: the daemon expects {status.get('n_kinematics')} dims")
        return res, None
    return res, recorded


class _ReplayLoop:
    """One replay's single thread: sends each bin on schedule and files what comes back into ``res``
    in between (one poll), so send and receive stamps come from one clock."""

    def __init__(
        self,
        *,
        rig: RigClient,
        sub: PredictionSubscriber,
        res: ReplayResult,
        events: tuple[list, list],
        kinematics: np.ndarray | None,
        realtime: bool,
        window: int,
        drain_timeout_s: float,
        progress: bool,
    ) -> None:
        self.rig, self.sub, self.res = rig, sub, res
        self.chans, self.times = events  # per bin: channels (n_k,), times (n_k,) ns
        self.kinematics = kinematics  # (T, D) or None
        self.realtime = realtime
        self.window = window
        self.drain_timeout_s = drain_timeout_s
        self.progress = progress
        self.n_recv = 0
        self._sock = sub.socket
        self._versions: dict[str, None] = {}  # insertion-ordered sets
        self._gens: dict[int, None] = {}

    def run(self) -> None:
        """RESET, every bin, the tail of predictions, a last PING/PONG and the closing RESET."""
        res, T = self.res, self.res.n_bins
        t0 = _now()  # the replay clock's zero: the stream starts now, at bin 0
        self.rig.send_reset(start=0, free_run=not self.realtime)
        for k in range(T):
            if self.realtime:
                self._wait_until(t0 + (k + 1) * res.bin_ns)
            else:
                self._wait_for_window(k)
            self._send_bin(k)
            self._drain()
            if self.progress and k and k % 1000 == 0:
                print(f"replay: {k}/{T} bins sent, {self.n_recv} predictions back", flush=True)
        self._collect_tail()
        res.wall_s = (_now() - t0) / 1e9
        try:  # a last PING/PONG: the daemon has handled everything we sent (the last KINEMATICS too)
            wait_for_daemon(self.rig, self.sub, timeout=self.drain_timeout_s)
        except TimeoutError:
            res.notes.append("no PONG after the last bin")
        self.rig.send_reset()  # end the stream: a real-time daemon would otherwise keep closing stalled bins
        res.model_versions = list(self._versions)
        res.generations = list(self._gens)

    # ------------------------------------------------------------------ sending
    def _send_bin(self, k: int) -> None:
        """Bin ``k``'s bin-closing SPIKES packet (clock = the bin's end), then its KINEMATICS."""
        rig, res = self.rig, self.res
        frames = encode_spikes(
            source=rig.source_id,
            seq=rig.seq,
            channels=self.chans[k],
            times=self.times[k],
            clock=(k + 1) * res.bin_ns,
        )
        res.t_send[k] = _now()
        rig.send_frames(frames)
        rig.seq += 1
        res.events_sent += self.chans[k].shape[0]
        if self.kinematics is not None:
            rig.send_frames(
                encode_kinematics(source=rig.source_id, seq=rig.seq, first=k, values=self.kinematics[k])
            )
            rig.seq += 1

    def _wait_until(self, due: int) -> None:
        """Real-time pace: receive until the clock reaches ``due`` (ns); sleep out the last ms."""
        while (left := due - _now()) > 0:
            if left > 1_000_000:
                self._poll((left - 500_000) // 1_000_000)
            else:
                time.sleep(left / 1e9)

    def _wait_for_window(self, k: int) -> None:
        """Fast pace: receive until fewer than ``window`` bins are in flight before sending bin ``k``."""
        while k - self.n_recv >= self.window:
            if not self._poll(int(self.drain_timeout_s * 1000)):
                self.res.notes.append(
                    f"fast replay: no prediction for {self.drain_timeout_s} s at bin {k}; went on"
                )
                return

    # ------------------------------------------------------------------ receiving
    def _collect_tail(self) -> None:
        """After the last bin: receive until every bin is back or none came for ``drain_timeout_s``."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self.n_recv < self.res.n_bins and time.monotonic() < deadline:
            if self._poll(50):
                deadline = time.monotonic() + self.drain_timeout_s

    def _poll(self, timeout_ms: int) -> bool:
        """Wait up to ``timeout_ms`` for a message, then take all that are queued; whether any was."""
        if self._sock.poll(timeout_ms, zmq.POLLIN):
            self._drain()
            return True
        return False

    def _drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._take(frames)

    def _take(self, frames: list) -> None:
        """File one prediction of this replay's stream by bin (others count as extra; PONGs are skipped)."""
        t = _now()
        m = parse_output(frames)
        if not isinstance(m, Prediction):
            return
        res, k = self.res, m.bin
        if m.epoch != res.epoch or not (0 <= k < res.n_bins) or res.received[k]:
            res.extra_predictions += 1
            return
        res.received[k] = True
        res.t_client_recv[k] = t
        d = min(res.velocity.shape[1], m.velocity.shape[0])
        res.velocity[k, :d] = m.velocity[:d]
        res.flags[k] = m.flags
        res.n_spikes[k] = m.n_spikes
        res.t_daemon[k] = (m.t_recv_ns, m.t_close_ns, m.t_infer_ns, m.t_publish_ns)
        res.generation[k] = m.generation
        res.versions_by_generation.setdefault(m.generation, m.model_version)
        self._versions.setdefault(m.model_version)
        self._gens.setdefault(m.generation)
        self.n_recv += 1
