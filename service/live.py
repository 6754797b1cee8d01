"""The live page's feed: ``GET /events`` (server-sent events) and the predictions behind it.

``GET /events`` is read-only and needs no token: every ``1 / LIVE_HZ`` s it sends one
``event: state`` whose ``data`` is a JSON object (:func:`live_state`): model version and
generation, the counters (bins decoded, bins lost, rejects by reason), per-stage latency
(p50/p99/max in ms), calibration jobs, and the predictions published since the previous event
(``points``: ``[epoch, bin, flags, y_0, …, y_{D−1}]``; a non-finite output is ``null``).  The
page at ``GET /`` (``service/static``) draws them; anything else may read the stream too
(``curl -N http://127.0.0.1:8000/events``).

The predictions come from :class:`PredictionFeed`: a SUB socket on the daemon's own publish
endpoint, as any subscriber's, so the decode loop is not touched.  Its thread runs only while at
least one ``/events`` client is connected, and wakes ``LIVE_HZ`` times a second to drain what
ZeroMQ queued (in ZeroMQ's I/O thread, outside the GIL) — never once per prediction, so a
watcher does not make the decode thread wait for the GIL on every bin.  A subscriber that falls
behind its high-water mark loses predictions inside ZeroMQ (the page shows a gap, the daemon
does not wait), and the feed keeps only the last ``capacity`` of them.  An ``inproc://`` publish
endpoint belongs to the daemon's own ZeroMQ context: then the feed has no predictions
(``trajectory: false``) and the page shows only the numbers.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
from starlette.concurrency import run_in_threadpool

from streaming.protocol import PREDICTION_TOPIC, Prediction, ProtocolError, parse_output

log = logging.getLogger("rpnt.live")

LIVE_HZ = 4.0  # events per second on /events
JOBS_EVERY_S = 2.0  # calibration jobs are read from the registry at most this often (per app)
N_JOBS = 5  # the most recent jobs sent
STOP_IDLE_S = 2.0  # the feed's thread ends this long after its last client left


def connect_endpoint(bound: str) -> str | None:
    """The endpoint a subscriber in this process connects to for a daemon's bound publish
    endpoint (``tcp://0.0.0.0:P`` → ``tcp://127.0.0.1:P``); None for ``inproc://``."""
    if bound.startswith("inproc://"):
        return None
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if bound.startswith(wildcard):
            return "tcp://127.0.0.1:" + bound[len(wildcard) :]
    if bound.startswith("tcp://[::]:"):
        return "tcp://[::1]:" + bound[len("tcp://[::]:") :]
    return bound


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def prediction_point(p: Prediction) -> list:
    """``[epoch, bin, flags, y_0, …]`` of one prediction (JSON-ready: non-finite → None)."""
    return [int(p.epoch), int(p.bin), int(p.flags), *(_finite(v) for v in p.velocity.tolist())]


class PredictionFeed:
    """The last ``capacity`` predictions of the daemon whose bound publish endpoint ``endpoint()``
    names (read when the first reader arrives: a port picked at bind time is known by then; see
    the module docstring).  Readers call :meth:`open` / :meth:`close` around their use and page
    through :meth:`since` by serial number."""

    def __init__(
        self, *, endpoint: Callable[[], str], capacity: int = 2000, poll_hz: float = LIVE_HZ
    ) -> None:
        self._bound = endpoint
        self.endpoint: str | None = None
        self.capacity = int(capacity)
        self._period = 1.0 / float(poll_hz)
        self._points: collections.deque[list] = collections.deque(maxlen=self.capacity)
        self._next = 0  # serial of the next point
        self._lock = threading.Lock()
        self._readers = 0
        self._last_reader = 0.0
        self._thread: threading.Thread | None = None
        self.errors = 0  # undecodable messages seen (none expected from a daemon)

    @property
    def available(self) -> bool:
        """Whether predictions can be had (False for an ``inproc://`` publish endpoint)."""
        return connect_endpoint(self._bound()) is not None

    def open(self) -> None:
        """A reader arrives: start the SUB thread if it is not running."""
        with self._lock:
            self._readers += 1
            self.endpoint = connect_endpoint(self._bound())
            if self.endpoint is not None and self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self.endpoint,), name="rpnt-live-feed", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """A reader leaves (the thread ends ``STOP_IDLE_S`` after the last one)."""
        with self._lock:
            self._readers = max(0, self._readers - 1)
            self._last_reader = time.monotonic()

    def since(self, serial: int) -> tuple[list[list], int]:
        """(points with serial ≥ ``serial`` still held, the next serial)."""
        with self._lock:
            first = self._next - len(self._points)
            skip = max(0, serial - first)
            return list(self._points)[skip:], self._next

    def _retire_if_idle(self) -> bool:
        """True (and the thread is forgotten, so the next reader starts a new one) when no reader
        has been here for ``STOP_IDLE_S``; decided under the readers' lock."""
        with self._lock:
            if self._readers == 0 and time.monotonic() - self._last_reader > STOP_IDLE_S:
                self._thread = None
                return True
            return False

    def _run(self, endpoint: str) -> None:
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self.capacity * 4)
            sock.setsockopt(zmq.SUBSCRIBE, PREDICTION_TOPIC)
            sock.connect(endpoint)
            while not self._retire_if_idle():
                time.sleep(self._period)
                self._drain(sock)
        except zmq.ZMQError as exc:
            log.warning("live feed on %s stopped: %s", self.endpoint, exc)
            with self._lock:
                self._thread = None
        finally:
            sock.close(0)
            ctx.term()

    def _drain(self, sock: zmq.Socket) -> None:
        batch = []
        for _ in range(self.capacity):  # bounded work per wake; the rest waits for the next one
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = parse_output(frames)
            except ProtocolError:
                self.errors += 1
                continue
            if isinstance(msg, Prediction):
                batch.append(prediction_point(msg))
        if batch:
            with self._lock:
                self._points.extend(batch)
                self._next += len(batch)


def _latency(latency_ms: dict) -> dict:
    keys = ("count", "p50_ms", "p99_ms", "max_ms", "mean_ms")
    return {stage: {k: s[k] for k in keys if k in s} for stage, s in latency_ms.items()}


def _job_row(job: dict, current: dict | None) -> dict:
    row = {k: job.get(k) for k in ("id", "state", "source", "version", "live", "created")}
    if current is not None:
        row["phase"] = current.get("phase")
        row["progress"] = current.get("progress")
    return row


def calibration_jobs(control: Any) -> list[dict]:
    """The ``N_JOBS`` most recent calibration jobs, newest first (the running one with its phase)."""
    cal = control.calibration
    running = cal.busy()
    return [_job_row(j, cal.get(j["id"]) if j.get("id") == running else None) for j in cal.jobs()[-N_JOBS:]][
        ::-1
    ]


def live_state(control: Any, *, points: list[list], trajectory: bool, jobs: list[dict]) -> dict:
    """One ``/events`` payload (see the module docstring)."""
    daemon = control.daemon
    st = daemon.status()
    snap = daemon.snapshot()
    c = snap["counters"]
    out = {
        "t": time.time(),
        "running": st["running"],
        "uptime_s": st["uptime_s"],
        "bin_s": st["bin_s"],
        "n_outputs": st["n_outputs"],
        "target": st["target"],
        "model": {
            "version": st["model_version"],
            "generation": st["generation"],
            "registry_version": control.live_version,
            "swap_pending": st["pending_swaps"] > 0,
        },
        "counters": {
            k: c.get(k, 0)
            for k in (
                "bins",
                "bins_stalled",
                "bins_discarded",
                "gaps",
                "late_events",
                "late_packets",
                "publish_dropped",
                "decode_errors",
                "messages",
                "events",
                "swaps",
            )
        },
        "rejected": dict(snap["rejected"]),
        "rejected_total": sum(snap["rejected"].values()),
        "latency_ms": _latency(snap["latency_ms"]),
        "calibration": {
            "running": control.calibration.busy(),
            "totals": dict(control.calibration.totals),
            "jobs": jobs,
        },
        "trajectory": trajectory,
        "points": points,
    }
    return out


class SharedState:
    """:func:`live_state` less the points, computed at most once per ``ttl`` seconds whatever the
    number of ``/events`` clients (each adds only its own points); the calibration jobs (read from
    the registry's files) at most once per ``JOBS_EVERY_S``."""

    def __init__(self, control: Any, *, ttl: float) -> None:
        self._control = control
        self._ttl = float(ttl)
        self._lock = threading.Lock()
        self._state: dict | None = None
        self._at = -math.inf
        self._jobs: list[dict] = []
        self._jobs_at = -math.inf

    def get(self, *, trajectory: bool) -> dict:
        now = time.monotonic()
        with self._lock:
            if now - self._jobs_at >= JOBS_EVERY_S:
                self._jobs, self._jobs_at = calibration_jobs(self._control), now
            if self._state is None or now - self._at >= self._ttl:
                self._state = live_state(self._control, points=[], trajectory=trajectory, jobs=self._jobs)
                self._at = now
            return self._state


async def event_stream(
    control: Any, feed: PredictionFeed, shared: SharedState, *, hz: float = LIVE_HZ
) -> AsyncIterator[str]:
    """The ``text/event-stream`` body of ``GET /events`` (ends when ``control.closing`` is set)."""
    period = 1.0 / hz
    feed.open()
    try:
        serial = 0  # the first event carries every prediction the feed still holds
        yield f"retry: {int(period * 4000)}\n\n"
        while not control.closing.is_set():
            points, serial = feed.since(serial)
            state = await run_in_threadpool(shared.get, trajectory=feed.available)
            yield (
                "event: state\ndata: "
                + json.dumps(state | {"points": points}, separators=(",", ":"), allow_nan=False)
                + "\n\n"
            )
            await asyncio.sleep(period)
    finally:
        feed.close()
