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
def events_for_bin(counts_row: np.ndarray, k: int, bin_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """One bin's counts (N,) → (channels (n,) uint16, times (n,) int64 ns), sorted by time then channel."""
    ch, tm = events_from_counts(np.asarray(counts_row)[None], bin_ns, first_bin=k)
    return ch[0], tm[0]


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
    """Replay ``counts`` (T, N) as events to the daemon at ``ingest``; collect its predictions from
    ``publish``.  ``labels``: the recording's behaviour series by name (T, D_k) each; the one the
    daemon's model decodes (its status's ``target``) is ``res.recorded`` and is sent as KINEMATICS
    when ``send_kinematics``."""
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
        if int(status.get("bin_ns", -1)) != int(bin_ns):
            raise ReplayError(
                f"the daemon bins at {_ms(status.get('bin_ns'))}, this replay at {_ms(bin_ns)} "
                f"(replay with --bin-ms {_ms(status.get('bin_ns'), unit=False)}, or start the daemon "
                f"with --bin-ms {_ms(bin_ns, unit=False)})"
            )
        if int(status.get("n_channels", -1)) != N:
            raise ReplayError(
                f"the daemon's model takes {status.get('n_channels')} channels, the recording has {N}"
            )
        target = str(status.get("target", "velocity"))
        velocity = (labels or {}).get(target)
        kin_ok = (
            send_kinematics
            and velocity is not None
            and int(status.get("n_kinematics", -1)) == velocity.shape[1]
        )
        epoch = int(status.get("epoch", 0)) + 1  # the RESET below starts the next stream
        D = int(status.get("n_outputs", velocity.shape[1] if velocity is not None else 1))
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
            recorded=velocity,
            generation=np.full(T, -1, np.int64),
            epoch=epoch,
        )
        if labels and velocity is None:
            res.notes.append(
                f"the daemon decodes {target}, which the recording does not have "
                f"(it has {', '.join(labels)}): nothing to score against"
            )
        if send_kinematics and velocity is not None and not kin_ok:
            res.notes.append(f"kinematics not sent: the daemon expects {status.get('n_kinematics')} dims")
        sock = sub.socket
        poll_in = zmq.POLLIN
        n_recv = 0
        versions: dict[str, None] = {}
        gens: dict[int, None] = {}

        def take(frames: list) -> None:
            nonlocal n_recv
            t = _now()
            m = parse_output(frames)
            if not isinstance(m, Prediction):
                return
            k = m.bin
            if m.epoch != epoch or not (0 <= k < T) or res.received[k]:
                res.extra_predictions += 1
                return
            res.received[k] = True
            res.t_client_recv[k] = t
            d = min(D, m.velocity.shape[0])
            res.velocity[k, :d] = m.velocity[:d]
            res.flags[k] = m.flags
            res.n_spikes[k] = m.n_spikes
            res.t_daemon[k] = (m.t_recv_ns, m.t_close_ns, m.t_infer_ns, m.t_publish_ns)
            res.generation[k] = m.generation
            res.versions_by_generation.setdefault(m.generation, m.model_version)
            versions.setdefault(m.model_version)
            gens.setdefault(m.generation)
            n_recv += 1

        def drain_nowait() -> None:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    return
                take(frames)

        t0 = start = _now()  # the replay clock's zero: the stream starts now, at bin 0
        rig.send_reset(start=0, free_run=not realtime)
        for k in range(T):
            if realtime:
                due = start + (k + 1) * bin_ns
                while True:
                    left = due - _now()
                    if left <= 0:
                        break
                    if left > 1_000_000:
                        if sock.poll((left - 500_000) // 1_000_000, poll_in):
                            drain_nowait()
                    else:
                        time.sleep(left / 1e9)
            else:
                while k - n_recv >= window:  # at most `window` bins in flight
                    if sock.poll(int(drain_timeout_s * 1000), poll_in):
                        drain_nowait()
                    else:
                        res.notes.append(
                            f"fast replay: no prediction for {drain_timeout_s} s at bin {k}; went on"
                        )
                        break
            frames = encode_spikes(
                source=rig.source_id, seq=rig.seq, channels=chans[k], times=times[k], clock=(k + 1) * bin_ns
            )
            res.t_send[k] = _now()
            rig.send_frames(frames)
            rig.seq += 1
            res.events_sent += chans[k].shape[0]
            if kin_ok:
                rig.send_frames(
                    encode_kinematics(source=rig.source_id, seq=rig.seq, first=k, values=velocity[k])
                )
                rig.seq += 1
            drain_nowait()
            if progress and k and k % 1000 == 0:
                print(f"replay: {k}/{T} bins sent, {n_recv} predictions back", flush=True)
        # collect the tail
        deadline = time.monotonic() + drain_timeout_s
        while n_recv < T and time.monotonic() < deadline:
            if sock.poll(50, poll_in):
                drain_nowait()
                deadline = time.monotonic() + drain_timeout_s
        res.wall_s = (_now() - t0) / 1e9
        try:  # a last PING/PONG: the daemon has handled everything we sent (the last KINEMATICS too)
            wait_for_daemon(rig, sub, timeout=drain_timeout_s)
        except TimeoutError:
            res.notes.append("no PONG after the last bin")
        rig.send_reset()  # end the stream: a real-time daemon would otherwise keep closing stalled bins
        res.model_versions = list(versions)
        res.generations = list(gens)
        return res
    finally:
        rig.close()
        sub.close()
