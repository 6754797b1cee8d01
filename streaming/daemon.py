"""The streaming decoder daemon: ZeroMQ ingest → binner → decoder.step → PUB, in one loop thread.

    daemon = Daemon(decoder=load_engine("exports/m1"), bin_s=0.02,
                    ingest="tcp://127.0.0.1:5555", publish="tcp://127.0.0.1:5556")
    daemon.start()                  # background thread; or daemon.run() to block in this one
    daemon.snapshot()               # counters + latency histograms (cheap, any thread)
    ticket = daemon.swap_decoder(new_engine); ticket.wait(5.0)   # → bin index it took effect at
    counts, velocity = daemon.recent_training_data(60.0)
    daemon.stop(); daemon.join()

The hot path is a straight line in the loop thread: ``recv`` → :func:`~streaming.protocol.read_header`
→ sequence accounting → :func:`~streaming.protocol.parse_body` → per-source checks →
:class:`~streaming.binner.Binner` → ``decoder.step`` → ``PUB.send``.
Everything else hangs off it:

- Logging goes through :class:`~streaming.logsink.LogSink` (a queue and a writer thread), rate
  limited per reason.  Metrics are counters and fixed-size histograms that other threads copy
  (:meth:`Daemon.snapshot`); nothing is exported from the loop.
- The PUB socket never blocks: a slow or absent subscriber loses predictions at its own high-water
  mark (``publish_hwm``), the loop does not wait.
- Commands from other threads (:meth:`swap_decoder`, :meth:`reset`) are messages on a deque that
  the loop applies itself — a swap exactly at a bin boundary.
- The ZeroMQ context and both sockets are created, used and closed by the loop thread only.

Decoder state is the decoder's: the daemon calls ``reset()`` before the first bin of every stream
(flag FIRST) and ``step(counts)`` once per bin, in order, for every bin of the stream.  All
daemon-side state is bounded (source table, kinematics pending map, history ring, histograms), so
hours of streaming grow neither memory nor per-bin time.

Bad input never stops the loop: each rejected message is counted under its reason
(:data:`~streaming.protocol.REJECT_REASONS`) and logged at most once per ``log_interval_s`` per
reason; the next prediction carries the REJECTED flag.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
import zmq

from rpnt_core.decoder import Decoder

from . import realtime
from .binner import Binner
from .history import HistoryRing
from .latency import STAGES, StageHistograms
from .logsink import LogSink
from .protocol import (
    DEFAULT_LIMITS,
    MAX_TIME_NS,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    IngestMessage,
    Limits,
    MsgType,
    PredFlag,
    ProtocolError,
    encode_pong,
    encode_prediction,
    parse_body,
    read_header,
)
from .sources import DUPLICATE, SourceTable

DEFAULT_INGEST = "tcp://127.0.0.1:5555"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

_now = time.monotonic_ns
# plain ints on the hot path (IntEnum / IntFlag operations run Python code)
_FIRST, _GAP, _REJECTED, _ERROR, _SWAPPED = (
    int(f) for f in (PredFlag.FIRST, PredFlag.GAP, PredFlag.REJECTED, PredFlag.ERROR, PredFlag.SWAPPED)
)
_NOBLOCK, _SNDMORE_NOBLOCK = zmq.NOBLOCK, zmq.SNDMORE | zmq.NOBLOCK
_SPIKES, _TICK, _COUNTS, _KINEMATICS, _RESET, _PING = (
    MsgType.SPIKES,
    MsgType.TICK,
    MsgType.COUNTS,
    MsgType.KINEMATICS,
    MsgType.RESET,
    MsgType.PING,
)


def check_endpoint(endpoint: str, *, allow_remote: bool = False) -> str:
    """A ZeroMQ bind endpoint; ``tcp://`` must name a loopback host unless ``allow_remote``."""
    scheme = endpoint.split("://", 1)[0] if "://" in endpoint else ""
    if scheme in ("ipc", "inproc"):
        return endpoint
    if scheme != "tcp":
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    host = urlsplit(endpoint).hostname or endpoint[len("tcp://") :].rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS and host.strip("[]") not in LOOPBACK_HOSTS and not allow_remote:
        raise ValueError(
            f"endpoint {endpoint!r} is not loopback; pass allow_remote=True (--allow-remote) to "
            "bind other interfaces"
        )
    return endpoint


def max_jump_bins(*, max_jump_s: float, bin_ns: int) -> int:
    """The most bins one message may close: ⌈max_jump_s / Δ⌉, at least 1 (exact, in integer ns)."""
    return max(1, -(-round(max_jump_s * 1e9) // bin_ns))


@dataclass(frozen=True, kw_only=True)
class DaemonOptions:
    """Everything about the daemon that is not the decoder, the bin width or the endpoints.

    stall_timeout_s: how long past its due time the open bin waits for a reported time before the
        wall-clock deadline closes it (flag STALLED).  None = one bin width.
    max_jump_s: no one message closes more than J = ⌈max_jump_s / Δ⌉ bins: a message whose latest
        time falls more than J bins past the open bin (past its own first bin, when it starts a
        stream) is rejected (``time_jump``); a rig whose clock really jumps sends RESET.
    limits: per-message size limits (``oversized``); max_message_bytes: ZMQ_MAXMSGSIZE, the socket's
        hard cap per frame (a peer sending more is disconnected by ZeroMQ itself).
    max_sources: sources tracked for sequence accounting (least recently seen evicted).
    history_s: seconds of (counts, kinematics) kept for :meth:`Daemon.recent_training_data`.
    n_kinematics: width D of KINEMATICS messages (None = the decoder's n_outputs).
    swap_catchup_bins: at most this many bins are replayed into a swapped-in decoder at the boundary
        (the bins decoded between its warm-up and the swap); more → it starts fresh.
    affinity, rt_priority, gc_freeze, warmup_bins: real-time habits (see :mod:`streaming.realtime`);
        each is optional and reported in :attr:`Daemon.startup`.
    publish_hwm / ingest_hwm: ZeroMQ high-water marks (messages) of the PUB and PULL sockets.
    log_interval_s: at most one log line per reject reason per interval.
    allow_bin_mismatch: decode at a bin width other than the decoder's ``info.bin_s``.
    allow_remote: bind non-loopback TCP endpoints.
    max_batch: messages drained per wake-up before the stall deadline is checked.
    record_s: keep every decoded bin of the run, up to this many seconds of bins, for
        :meth:`Daemon.recording` (the session recording, :mod:`streaming.recording`); 0 = none.
    busy_poll_us: after each message, poll without blocking for this long before sleeping in
        ``poll`` again (0 = always block).  Spinning through the gap between bins (e.g. 25000 at
        20 ms bins) keeps the decode core's caches and clock warm — a step right after a 20 ms sleep
        can take twice as long — at the price of one busy core.
    prewarm_lead_us: call the decoder's ``prewarm()`` (if it has one: the ONNX engines) this long
        before each bin is due, in the decode thread (0 = never).  After a 20 ms idle gap a step
        runs on cold caches; one extra run that does not advance the stream brings the weights
        back first, without another core.  Needs a lead longer than one step.
    """

    stall_timeout_s: float | None = None
    max_jump_s: float = 10.0
    limits: Limits = DEFAULT_LIMITS
    max_message_bytes: int = 64 << 20
    max_sources: int = 256
    history_s: float = 300.0
    max_pending_kinematics: int = 4096
    n_kinematics: int | None = None
    swap_catchup_bins: int = 16
    affinity: int | tuple[int, ...] | None = None
    rt_priority: int | None = None
    gc_freeze: bool = False
    warmup_bins: int = 32
    publish_hwm: int = 10_000
    ingest_hwm: int = 100_000
    log_interval_s: float = 5.0
    allow_bin_mismatch: bool = False
    allow_remote: bool = False
    max_batch: int = 64
    busy_poll_us: int = 0
    record_s: float = 0.0
    prewarm_lead_us: int = 0

    @classmethod
    def from_fields(cls, src) -> "DaemonOptions":
        """The options an operator sets, read by attribute from ``src``: the ``rpnt serve`` flags
        (an argparse namespace) or the ``[daemon]`` settings section — both name them
        ``stall_ms``, ``max_jump_s``, ``history_s``, ``warmup_bins``, ``affinity``, ``gc_freeze``,
        ``rt_priority``, ``allow_bin_mismatch``, ``busy_poll_us``, ``prewarm_lead_us``, ``allow_remote``;
        and, where present (the settings), ``record_nwb`` and ``record_max_s``: with a ``record_nwb``
        file the daemon records up to ``record_max_s`` of its run."""
        record_s = float(getattr(src, "record_max_s", 0.0)) if getattr(src, "record_nwb", None) else 0.0
        return cls(
            stall_timeout_s=None if src.stall_ms is None else src.stall_ms / 1e3,
            max_jump_s=src.max_jump_s,
            history_s=src.history_s,
            warmup_bins=src.warmup_bins,
            record_s=record_s,
            affinity=tuple(src.affinity) if src.affinity else None,
            gc_freeze=src.gc_freeze,
            rt_priority=src.rt_priority,
            allow_bin_mismatch=src.allow_bin_mismatch,
            busy_poll_us=src.busy_poll_us,
            prewarm_lead_us=src.prewarm_lead_us or 0,
            allow_remote=src.allow_remote,
        )


class SwapTicket:
    """A pending :meth:`Daemon.swap_decoder`: :meth:`wait` returns the bin index it took effect at."""

    def __init__(
        self, decoder: Decoder, *, warm: bool, warm_epoch: int, warm_last: int | None, warm_bins: int
    ) -> None:
        self.decoder = decoder
        self.warm = warm
        self.warm_epoch = warm_epoch
        self.warm_last = warm_last
        self.warm_bins = warm_bins
        self.bin: int | None = None
        self.epoch: int | None = None
        self.generation: int | None = None
        self.mode: str = ""
        self.error: str | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the swap is applied; return the first bin the new decoder decoded."""
        if not self._done.wait(timeout):
            raise TimeoutError("swap not applied yet (it takes effect at the next bin the daemon closes)")
        if self.error is not None:
            raise RuntimeError(self.error)
        assert self.bin is not None
        return self.bin

    def _resolve(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)
        self._done.set()


def _info_dict(decoder: Decoder) -> dict:
    i = decoder.info
    return {
        "name": i.name,
        "version": i.version,
        "fingerprint": i.fingerprint,
        "n_channels": i.n_channels,
        "n_outputs": i.n_outputs,
        "bin_s": i.bin_s,
        "extra": dict(i.extra),
    }


def model_version(decoder: Decoder) -> str:
    """What predictions carry as ``model_version``: ``info.version`` (the weights hash), else the name."""
    i = decoder.info
    return str(i.version or i.name or "unknown")


class Daemon:
    """The real-time decoding loop.  See the module docstring for the contract.

    Args:
        decoder: anything implementing :class:`rpnt_core.decoder.Decoder` (the ONNX Runtime engine
            from :func:`exporters.runtime.load_engine` in production).
        bin_s: bin width Δ in seconds (default 20 ms); must be a whole number of nanoseconds and,
            unless ``options.allow_bin_mismatch``, equal the decoder's ``info.bin_s``.
        ingest: endpoint the PULL socket binds (spike events, ticks, counts, kinematics, control).
        publish: endpoint the PUB socket binds (predictions, PONGs).
        options: :class:`DaemonOptions`.
        logger: where log lines go (default ``logging.getLogger("rpnt.streaming")``).
    """

    def __init__(
        self,
        *,
        decoder: Decoder,
        bin_s: float = 0.02,
        ingest: str = DEFAULT_INGEST,
        publish: str = DEFAULT_PUBLISH,
        options: DaemonOptions | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.options = opt = options or DaemonOptions()
        info = decoder.info
        if not (isinstance(bin_s, (int, float)) and math.isfinite(bin_s) and bin_s > 0):
            raise ValueError(f"bin_s: must be a positive number of seconds, got {bin_s!r}")
        bin_ns = round(bin_s * 1e9)
        if bin_ns < 1 or abs(bin_ns - bin_s * 1e9) > 1e-3:
            raise ValueError(f"bin_s: {bin_s} s is not a whole number of nanoseconds")
        if abs(float(info.bin_s) - bin_s) > 1e-9 and not opt.allow_bin_mismatch:
            raise ValueError(
                f"bin width: the daemon bins at {bin_s * 1e3:g} ms but the decoder "
                f"{info.name or ''} was trained at {info.bin_s * 1e3:g} ms; use --bin-ms "
                f"{info.bin_s * 1e3:g} (or allow_bin_mismatch / --allow-bin-mismatch)"
            )
        self.ingest = check_endpoint(ingest, allow_remote=opt.allow_remote)
        self.publish = check_endpoint(publish, allow_remote=opt.allow_remote)
        self.bin_s = float(bin_s)
        self.bin_ns = int(bin_ns)
        self.n_channels = int(info.n_channels)
        self.n_outputs = int(info.n_outputs)
        self.n_kinematics = int(opt.n_kinematics or info.n_outputs)
        self._limits = opt.limits
        self._stall_ns = int(round((opt.stall_timeout_s if opt.stall_timeout_s is not None else bin_s) * 1e9))
        self._decoder = decoder
        self._version_bytes = model_version(decoder).encode()
        self._nan_bytes = np.full(self.n_outputs, np.nan, dtype=np.float32).tobytes()
        self._generation = 1
        self._binner = Binner(
            n_channels=self.n_channels,
            bin_ns=self.bin_ns,
            emit=self._on_bin,
            max_jump_bins=max_jump_bins(max_jump_s=opt.max_jump_s, bin_ns=self.bin_ns),
        )
        self._sources = SourceTable(max_sources=opt.max_sources)
        self._history = HistoryRing(
            capacity=max(1, int(math.ceil(opt.history_s / bin_s))),
            n_channels=self.n_channels,
            n_kinematics=self.n_kinematics,
            max_pending=opt.max_pending_kinematics,
        )
        self._stages = StageHistograms(STAGES)
        self._recorder = None
        if opt.record_s > 0:
            from .recording import SessionRecorder

            self._recorder = SessionRecorder(
                n_channels=self.n_channels,
                n_outputs=self.n_outputs,
                max_bins=max(1, int(math.ceil(opt.record_s / bin_s))),
            )
            self._recorder.add_version(1, model_version(decoder))
        self._c: dict[str, int] = dict.fromkeys(
            (
                "messages",
                "spikes_msgs",
                "ticks",
                "counts_msgs",
                "kinematics_msgs",
                "resets",
                "pings",
                "events",
                "bins",
                "gaps",
                "rejected",
                "decode_errors",
                "publish_dropped",
                "publish_errors",
                "swaps",
            ),
            0,
        )
        self._rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._swap_q: collections.deque[SwapTicket] = collections.deque()
        self._control_q: collections.deque[tuple] = collections.deque()
        self._swaps: collections.deque[dict] = collections.deque(maxlen=64)
        self._log = LogSink(logger=logger, interval_s=opt.log_interval_s)
        self._handlers: dict[MsgType, Callable[[IngestMessage, int], None]] = {
            MsgType.SPIKES: self._on_spikes,
            MsgType.TICK: self._on_tick,
            MsgType.COUNTS: self._on_counts,
            MsgType.KINEMATICS: self._on_kinematics,
            MsgType.RESET: self._on_reset,
            MsgType.PING: self._on_ping,
        }
        self._t_recv = 0
        self._last_bin: int | None = None
        self._pub: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._running = False
        self._error: BaseException | None = None
        self._t_start_wall = time.time()
        self._t_start = _now()
        self.startup: dict = {}
        self.endpoints: dict[str, str] = {"ingest": self.ingest, "publish": self.publish}
        self._adapters: dict[str, Callable[[], dict]] = {}

    # ================================================================== lifecycle
    def start(self, timeout: float = 60.0) -> "Daemon":
        """Run the loop in a background thread; return once the sockets are bound and the engine is warm."""
        if self._thread is not None:
            raise RuntimeError("daemon already started")
        self._thread = threading.Thread(target=self._serve, name="rpnt-decode", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"daemon did not become ready within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"daemon failed to start: {self._error}") from self._error
        return self

    def run(self, *, on_ready: Callable[["Daemon"], None] | None = None) -> None:
        """Run the loop in the calling thread until :meth:`stop` (for ``rpnt serve``)."""
        self._serve(on_ready=on_ready)
        if self._error is not None:
            raise RuntimeError(f"daemon failed: {self._error}") from self._error

    def stop(self) -> None:
        """Ask the loop to finish (it exits within one poll interval, ≤ 20 ms when idle)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread; returns whether it has exited."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.join(10.0)

    # ================================================================== control plane (any thread)
    def attach_adapter(self, name: str, counters: Callable[[], dict]) -> None:
        """Show an adapter's counters (:mod:`streaming.adapters`) in :meth:`snapshot` under
        ``adapters[name]``; ``counters`` is called from the reading thread and must be cheap."""
        self._adapters[name] = counters

    def snapshot(self, *, buckets_ms: tuple[float, ...] | None = None) -> dict:
        """Counters, reject reasons, sequence balance and per-stage latency (plain dict, JSON-ready).

        Each number is exact; the dict is not one atomic cut across all of them (the loop keeps
        running while it is copied).  ``buckets_ms``: also give cumulative histogram buckets
        (``le`` edges in ms) per stage, for Prometheus-style export."""
        b = self._binner
        h = self._history
        counters = dict(self._c)
        counters.update(
            bins_stalled=b.bins_stalled,
            bins_discarded=b.bins_discarded,
            late_events=b.late_events,
            late_packets=b.late_packets,
            spikes=b.spikes,
            kinematics_stored=h.kinematics_stored,
            kinematics_stale=h.kinematics_stale,
            kinematics_dropped=h.kinematics_dropped,
        )
        rejected = {k: v for k, v in dict(self._rejects).items() if v}
        latency = {}
        for name, hist in self._stages.h.items():
            cp = hist.copy()
            latency[name] = cp.summary()
            if buckets_ms:
                latency[name]["buckets"] = cp.cumulative(buckets_ms)
        return {
            "uptime_s": (_now() - self._t_start) / 1e9,
            "running": self._running,
            "counters": counters,
            "rejected": rejected,
            "sequence": self._sources.summary(),
            "latency_ms": latency,
            "stream": {
                "epoch": b.epoch,
                "open_bin": b.k_open,
                "last_bin": self._last_bin,
                "free_run": b.free_run,
            },
            "adapters": {name: counters() for name, counters in list(self._adapters.items())},
        }

    def status(self) -> dict:
        """Model version, fingerprint, channels, bin width, uptime, bins decoded, endpoints, start-up report."""
        info = self._decoder.info
        return {
            "protocol_version": PROTOCOL_VERSION,
            "model_version": model_version(self._decoder),
            "fingerprint": info.fingerprint,
            "decoder": info.name,
            "generation": self._generation,
            "n_channels": self.n_channels,
            "n_outputs": int(info.n_outputs),
            "target": str((info.extra or {}).get("target", "velocity")),  # what the outputs are
            "n_kinematics": self.n_kinematics,
            "bin_s": self.bin_s,
            "bin_ns": self.bin_ns,
            "uptime_s": (_now() - self._t_start) / 1e9,
            "started_at": self._t_start_wall,
            "bins_decoded": self._c["bins"],
            "epoch": self._binner.epoch,
            "running": self._running,
            "ingest": self.endpoints["ingest"],
            "publish": self.endpoints["publish"],
            "swaps": list(self._swaps),
            "pending_swaps": len(self._swap_q),  # requested, to land at the next bin the loop closes
            "startup": self.startup,
        }

    def swap_decoder(
        self, new_decoder: Decoder, *, warm: bool = True, warm_bins: int | None = None
    ) -> SwapTicket:
        """Replace the decoder exactly at a bin boundary: the next bin the loop closes is decoded by
        ``new_decoder`` (no bin missed, none decoded twice) and carries flag SWAPPED, the new
        generation and the new model version.  Returns a :class:`SwapTicket` (``wait()`` → that bin).

        State: with ``warm`` (default) the new decoder is reset and run here, in the caller's thread,
        over the current stream's last ``warm_bins`` decoded bins (default: its receptive field − 1,
        from ``info.extra['receptive_field']``, else 256) from the history ring; at the boundary the
        loop feeds it the few bins decoded since (≤ ``swap_catchup_bins``), so its first output is
        what it would have said had it been running all along.  Without ``warm`` — or when the
        history does not hold those bins, or the swap lands on a stream's first bin — it starts
        fresh (``reset()``).  The ticket's ``mode`` says which happened.

        Raises ``ValueError`` if the new decoder's channel count differs from the daemon's.
        """
        info = new_decoder.info
        if int(info.n_channels) != self.n_channels:
            raise ValueError(
                f"swap_decoder: the new decoder takes {info.n_channels} channels, the stream has "
                f"{self.n_channels}"
            )
        if abs(float(info.bin_s) - self.bin_s) > 1e-9 and not self.options.allow_bin_mismatch:
            raise ValueError(
                f"swap_decoder: the new decoder was trained at {info.bin_s * 1e3:g} ms bins, the daemon "
                f"bins at {self.bin_s * 1e3:g} ms"
            )
        new_decoder.reset()
        epoch, last = self._binner.epoch, None
        n_warm = 0
        if warm:
            if warm_bins is None:
                rf = info.extra.get("receptive_field") if isinstance(info.extra, dict) else None
                warm_bins = int(rf) - 1 if rf else 256
            epoch, last, counts = self._history.stream_tail(max(0, int(warm_bins)))
            for row in counts:
                new_decoder.step(row)
            n_warm = int(counts.shape[0])
        ticket = SwapTicket(new_decoder, warm=warm, warm_epoch=epoch, warm_last=last, warm_bins=n_warm)
        self._swap_q.append(ticket)
        return ticket

    def reset(self, *, start_ns: int | None = None, free_run: bool = False) -> None:
        """End the current stream, as a RESET message would (applied by the loop within one poll interval)."""
        self._control_q.append(("reset", start_ns, free_run))

    def recent_training_data(self, seconds: float) -> tuple[np.ndarray, np.ndarray]:
        """Of the bins decoded in the last ``seconds`` (bounded by ``history_s``), those for which the
        rig streamed KINEMATICS: ``counts`` (T, N) int32 and ``velocity`` (T, D) float32, oldest first."""
        return self._history.training_data(int(math.ceil(float(seconds) / self.bin_s)))

    @property
    def history(self) -> HistoryRing:
        return self._history

    def recording(self, *, description: str = "rpnt serve session"):
        """The session recording (:class:`~streaming.nwb_out.DecodedSession`): every bin decoded
        since start, up to ``options.record_s``; None when not recording or nothing was decoded.
        Call it once the loop has stopped (:meth:`stop`, :meth:`join`)."""
        if self._recorder is None:
            return None
        return self._recorder.session(
            bin_ns=self.bin_ns, target=self.status()["target"], description=description
        )

    @property
    def bins_not_recorded(self) -> int:
        """Bins decoded after the recording reached ``options.record_s`` (not in :meth:`recording`)."""
        return 0 if self._recorder is None else self._recorder.bins_not_recorded

    # ================================================================== the loop
    def _serve(self, on_ready: Callable[["Daemon"], None] | None = None) -> None:
        ctx = pull = pub = None
        try:
            self._log.start()
            ctx = zmq.Context(io_threads=1)
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RCVHWM, self.options.ingest_hwm)
            pull.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_bytes)
            pull.bind(self.ingest)
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, self.options.publish_hwm)
            pub.bind(self.publish)
            self.endpoints = {
                "ingest": pull.getsockopt_string(zmq.LAST_ENDPOINT),
                "publish": pub.getsockopt_string(zmq.LAST_ENDPOINT),
            }
            self._pub = pub
            self.startup = self._startup_habits()
            self._t_start_wall, self._t_start = time.time(), _now()  # uptime counts from ready
            self._log.log(logging.INFO, f"rpnt daemon ready: {self.startup}")
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            for s in (pull, pub):
                if s is not None:
                    s.close(0)
            if ctx is not None:
                ctx.term()
            self._log.stop()
            return
        self._running = True
        self._ready.set()
        if on_ready is not None:
            on_ready(self)
        try:
            self._loop(pull)
        finally:
            self._running = False
            while self._swap_q:
                self._swap_q.popleft()._resolve(error="daemon stopped before the swap took effect")
            pull.close(0)
            pub.close(0)
            self._pub = None
            ctx.term()
            self._log.stop()

    def _startup_habits(self) -> dict:
        opt = self.options
        rep: dict = {
            "affinity": realtime.pin_thread(opt.affinity),
            "rt_priority": realtime.rt_priority(opt.rt_priority),
        }
        t0 = _now()
        n = max(0, int(opt.warmup_bins))
        if n:
            zero = np.zeros(self.n_channels, dtype=np.float32)
            for _ in range(n):
                self._decoder.step(zero)
        self._decoder.reset()
        rep["warmup"] = {
            "requested": n,
            "applied": n > 0,
            "detail": f"{n} engine steps in {(_now() - t0) / 1e6:.1f} ms, then reset" if n else "skipped",
        }
        rep["gc_freeze"] = realtime.freeze_gc(opt.gc_freeze)
        rep["busy_poll"] = {
            "requested": opt.busy_poll_us,
            "applied": opt.busy_poll_us > 0,
            "detail": (
                f"spins up to {opt.busy_poll_us} µs after each message before blocking"
                if opt.busy_poll_us > 0
                else "blocks in poll between messages"
            ),
        }
        rep["prewarm"] = {
            "requested_lead_us": opt.prewarm_lead_us,
            "applied": opt.prewarm_lead_us > 0 and hasattr(self._decoder, "prewarm"),
        }
        rep["endpoints"] = dict(self.endpoints)
        rep["bin_ms"] = self.bin_ns / 1e6
        rep["stall_timeout_ms"] = self._stall_ns / 1e6
        rep["model"] = _info_dict(self._decoder)
        return rep

    def _loop(self, pull: zmq.Socket) -> None:
        stop = self._stop
        binner = self._binner
        handle = self._handle
        recv = pull.recv_multipart
        poll = pull.poll
        max_batch = self.options.max_batch
        stall_ns = self._stall_ns
        POLLIN, NOBLOCK, Again = zmq.POLLIN, zmq.NOBLOCK, zmq.Again
        spin_ns = int(self.options.busy_poll_us) * 1000
        lead_ns = int(self.options.prewarm_lead_us) * 1000
        warmed_for = None  # the deadline of the bin last prewarmed for
        last_msg = _now()
        while not stop.is_set():
            dl = binner.deadline_ns(stall_ns)
            warm_at = None if not lead_ns or dl is None or dl == warmed_for else dl - stall_ns - lead_ns
            if warm_at is not None and _now() >= warm_at:
                warmed_for, warm_at = dl, None
                self._prewarm()
            if spin_ns and _now() - last_msg < spin_ns:
                timeout = 0  # busy-poll: keep the core (and its caches) hot for the next message
            elif dl is None:
                timeout = 20
            else:
                timeout = min(20, max(0, -(-(min(dl, warm_at or dl) - _now()) // 1_000_000)))
            drained = True
            if poll(timeout, POLLIN):
                drained = False
                last_msg = _now()
                for _ in range(max_batch):
                    try:
                        frames = recv(NOBLOCK)
                    except Again:
                        drained = True
                        break
                    handle(frames, _now())
            if self._control_q:
                self._apply_controls()
            if drained and dl is not None:
                # nothing is waiting on the socket: bins past their due time close now, flagged STALLED
                n = 0
                while n < max_batch:
                    dl = binner.deadline_ns(stall_ns)
                    now = _now()
                    if dl is None or now < dl:
                        break
                    self._t_recv = now
                    binner.close_stalled()
                    n += 1

    def _prewarm(self) -> None:
        """The decoder's ``prewarm()`` ahead of a bin (see ``DaemonOptions.prewarm_lead_us``)."""
        fn = getattr(self._decoder, "prewarm", None)
        if fn is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failing warm-up must not stop the stream
            self._log.limited("prewarm_error", logging.ERROR, f"decoder.prewarm failed: {exc!r}")

    # ------------------------------------------------------------------ ingest
    def _handle(self, frames: list, t_recv: int) -> None:
        """One ingest message: read its header, account its seq, then parse and apply the rest.

        Every message with a readable header (:func:`~streaming.protocol.read_header`) consumes its
        seq before anything else is judged, so a rejected message is counted as received, never as
        missing, and a rejected ``seq == 0`` still restarts the source's numbering."""
        self._t_recv = t_recv
        self._c["messages"] += 1
        try:
            head = read_header(frames)
        except ProtocolError as exc:
            self._reject(exc.reason, exc.detail, None)
            return
        except Exception as exc:  # noqa: BLE001 - never let a message kill the loop
            self._reject("internal", f"header: {exc!r}", None, tb=True)
            return
        source, seq = head[3], head[5]
        gap = self._sources.observe(source, seq)
        if gap:
            if gap == DUPLICATE:
                self._reject("duplicate", f"seq {seq}", source)
                return
            self._c["gaps"] += gap
            self._binner.raise_flags(_GAP)
            self._log.limited(
                "gap", logging.WARNING, f"source {source}: {gap} message(s) lost before seq {seq}"
            )
        try:
            msg = parse_body(head, frames, self._limits)
            t = msg.type
            if t is _SPIKES:
                self._on_spikes(msg, t_recv)
            elif t is _TICK:
                self._on_tick(msg, t_recv)
            else:
                self._handlers[t](msg, t_recv)
        except ProtocolError as exc:
            self._sources.note_reject(source)
            self._reject(exc.reason, exc.detail, source)
        except Exception as exc:  # noqa: BLE001
            self._sources.note_reject(source)
            self._reject("internal", f"message type {head[2]}: {exc!r}", source, tb=True)

    def _reject(self, reason: str, detail: str, source: int | None, tb: bool = False) -> None:
        self._c["rejected"] += 1
        self._rejects[reason] = self._rejects.get(reason, 0) + 1
        self._binner.raise_flags(_REJECTED)
        where = "" if source is None else f" from source {source}"
        msg = f"rejected message{where}: {reason}: {detail}"
        if tb:
            msg += "\n" + traceback.format_exc(limit=4)
        self._log.limited("reject:" + reason, logging.WARNING, msg)

    def _check_time(self, source: int, lo: int, hi: int) -> None:
        """Per-source and stream checks for a message reporting times [lo, hi] (ns)."""
        prev = self._sources.time_of(source)
        if lo < prev:
            raise ProtocolError(
                "time_regression", f"time {lo} ns < {prev} ns already reported by this source"
            )
        if not self._binner.jump_ok(lo, hi):
            raise ProtocolError(
                "time_jump",
                f"time {hi} ns is more than {self.options.max_jump_s:g} s ahead of the "
                f"open bin {self._binner.k_open}; send RESET for a new clock",
            )

    def _on_spikes(self, msg: IngestMessage, t_recv: int) -> None:
        self._c["spikes_msgs"] += 1
        ch, tm, clock = msg.channels, msg.times_ns, msg.clock_ns
        n = tm.shape[0]
        if n:
            top = int(ch.max())
            if top >= self.n_channels:
                raise ProtocolError("channel_range", f"channel id {top} ≥ {self.n_channels} channels")
            lo, hi = int(tm[0]), int(tm[-1])
            if clock is not None and clock > hi:
                hi = clock
        elif clock is None:
            return
        else:
            lo = hi = clock
        self._check_time(msg.source, lo, hi)
        self._sources.report_time(msg.source, hi)
        self._c["events"] += n
        self._binner.add_events(ch, tm, clock, t_recv)

    def _on_tick(self, msg: IngestMessage, t_recv: int) -> None:
        self._c["ticks"] += 1
        clock = msg.clock_ns
        self._check_time(msg.source, clock, clock)
        self._sources.report_time(msg.source, clock)
        self._binner.advance(clock, t_recv)

    def _first_bin(self, msg: IngestMessage, n_rows: int) -> int:
        """The bin of a COUNTS/KINEMATICS block's first row; ``time_range`` if its last row ends past 2⁶² ns."""
        first = msg.first // self.bin_ns if msg.time_is_clock else msg.first
        if (first + n_rows) * self.bin_ns > MAX_TIME_NS:
            raise ProtocolError(
                "time_range", f"bins {first}…{first + n_rows - 1} reach beyond the clock range"
            )
        return first

    def _on_counts(self, msg: IngestMessage, t_recv: int) -> None:
        self._c["counts_msgs"] += 1
        counts = msg.counts
        if counts.shape[1] != self.n_channels:
            raise ProtocolError(
                "channel_count", f"{counts.shape[1]} channels, the model takes {self.n_channels}"
            )
        if msg.aux and msg.aux != self.bin_ns:
            raise ProtocolError(
                "bin_width", f"binned at {msg.aux / 1e6:g} ms, the daemon bins at {self.bin_ns / 1e6:g} ms"
            )
        first = self._first_bin(msg, counts.shape[0])
        lo, hi = first * self.bin_ns, (first + counts.shape[0]) * self.bin_ns
        self._check_time(msg.source, lo, hi)
        self._sources.report_time(msg.source, hi)
        self._binner.add_counts(first, counts, t_recv)

    def _on_kinematics(self, msg: IngestMessage, t_recv: int) -> None:
        self._c["kinematics_msgs"] += 1
        vals = msg.values
        if vals.shape[1] != self.n_kinematics:
            raise ProtocolError(
                "dims", f"{vals.shape[1]} kinematics dims, the daemon expects {self.n_kinematics}"
            )
        first = self._first_bin(msg, vals.shape[0])
        b = self._binner
        if b.started and first + vals.shape[0] - 1 - b.k_open > min(
            b.max_jump_bins, self.options.max_pending_kinematics
        ):
            raise ProtocolError(
                "time_jump",
                f"kinematics for bin {first + vals.shape[0] - 1}, far ahead of the open bin {b.k_open}",
            )
        epoch = b.epoch if b.started else b.epoch + 1  # before a stream starts: for the one about to
        self._history.add_kinematics(epoch, first, vals)
        if self._recorder is not None:
            self._recorder.add_kinematics(epoch, first, vals)

    def _on_reset(self, msg: IngestMessage, t_recv: int) -> None:
        self._do_reset(msg.clock_ns, msg.free_run, t_recv)

    def _do_reset(self, start_ns: int | None, free_run: bool, wall_ns: int) -> None:
        self._c["resets"] += 1
        self._binner.reset(start_ns=start_ns, free_run=free_run, wall_ns=wall_ns)
        self._sources.clear_times()

    def _on_ping(self, msg: IngestMessage, t_recv: int) -> None:
        self._c["pings"] += 1
        st = self.status()
        st.pop("startup", None)
        st["open_bin"] = self._binner.k_open
        st["rejected"] = {k: v for k, v in self._rejects.items() if v}
        st["sequence"] = self._sources.source_summary(msg.source)
        try:
            self._pub.send_multipart(
                encode_pong(token=msg.token, source=msg.source, seq=msg.seq, status=st), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            self._c["publish_errors"] += 1

    def _apply_controls(self) -> None:
        while self._control_q:
            cmd = self._control_q.popleft()
            if cmd[0] == "reset":
                self._do_reset(cmd[1], cmd[2], _now())

    # ------------------------------------------------------------------ one bin: decode + publish
    def _on_bin(self, k: int, counts: np.ndarray, n_spikes: int, flags: int) -> None:
        """Called by the binner for every closed bin, in order (counts (N,) int64, valid during the call)."""
        t_close = _now()
        if self._swap_q:
            flags = self._apply_swaps(k, flags)
        dec = self._decoder
        epoch = self._binner.epoch
        try:
            if flags & _FIRST:
                dec.reset()
            vel = dec.step(counts)
            vb = np.asarray(vel, dtype=np.float32).tobytes()
            d = len(vb) // 4
        except Exception as exc:  # noqa: BLE001 - a failing engine must not stop the stream
            flags |= _ERROR
            vb, d = self._nan_bytes, self.n_outputs
            self._c["decode_errors"] += 1
            self._log.limited("decode_error", logging.ERROR, f"decoder.step failed on bin {k}: {exc!r}")
        t_infer = _now()
        self._c["bins"] += 1  # counted before the send: whoever sees bin k's prediction sees it counted
        self._last_bin = k
        frames = encode_prediction(
            bin=k,
            bin_ns=self.bin_ns,
            velocity_bytes=vb,
            n_outputs=d,
            model_version=self._version_bytes,
            flags=flags,
            epoch=epoch,
            generation=self._generation,
            t_recv_ns=self._t_recv,
            t_close_ns=t_close,
            t_infer_ns=t_infer,
            t_publish_ns=_now(),
            n_spikes=n_spikes,
        )
        try:
            send = self._pub.send  # three frames; plain send() skips send_multipart's per-frame checks
            send(frames[0], _SNDMORE_NOBLOCK)
            send(frames[1], _SNDMORE_NOBLOCK)
            send(frames[2], _NOBLOCK)
        except zmq.Again:
            self._c["publish_dropped"] += 1
        except zmq.ZMQError as exc:
            self._c["publish_errors"] += 1
            self._log.limited("publish_error", logging.ERROR, f"publish failed on bin {k}: {exc!r}")
        t_pub = _now()
        h = self._stages.h
        t_recv = self._t_recv
        h["parse"].record(t_close - t_recv)
        h["infer"].record(t_infer - t_close)
        h["publish"].record(t_pub - t_infer)
        h["daemon"].record(t_pub - t_recv)
        self._history.append(epoch, k, counts)
        if self._recorder is not None:
            self._recorder.append(
                epoch=epoch,
                k=k,
                counts=counts,
                output=vb,
                flags=flags,
                n_spikes=n_spikes,
                generation=self._generation,
                stamps=(t_recv, t_close, t_infer, t_pub),
            )

    def _apply_swaps(self, k: int, flags: int) -> int:
        epoch = self._binner.epoch
        while self._swap_q:
            t = self._swap_q.popleft()
            new = t.decoder
            if flags & _FIRST:
                mode = "fresh (first bin of a stream)"  # reset below, with every stream start
            elif t.warm and t.warm_epoch == epoch and t.warm_last is not None:
                gap = k - 1 - t.warm_last
                fill = (
                    self._history.stream_range(epoch, t.warm_last + 1, k)
                    if gap <= self.options.swap_catchup_bins
                    else None
                )
                if fill is None:
                    new.reset()
                    mode = (
                        f"fresh (the {gap} bins since warm-up exceed swap_catchup_bins or left the history)"
                    )
                else:
                    for row in fill:
                        new.step(row)
                    mode = f"warm ({t.warm_bins} bins of history + {fill.shape[0]} at the boundary)"
            else:
                new.reset()
                mode = "fresh" if not t.warm else "fresh (no history of this stream to warm on)"
            self._decoder = new
            self._generation += 1
            self._version_bytes = model_version(new).encode()
            self._nan_bytes = np.full(int(new.info.n_outputs), np.nan, dtype=np.float32).tobytes()
            self._c["swaps"] += 1
            if self._recorder is not None:
                self._recorder.add_version(self._generation, model_version(new))
            rec = {
                "bin": k,
                "epoch": epoch,
                "generation": self._generation,
                "model_version": model_version(new),
                "mode": mode,
                "time": time.time(),
            }
            self._swaps.append(rec)
            self._log.log(logging.INFO, f"decoder swapped at bin {k}: {rec}")
            t._resolve(bin=k, epoch=epoch, generation=self._generation, mode=mode)
            flags |= _SWAPPED
        return flags
