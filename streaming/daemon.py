"""The streaming decoder daemon: ZeroMQ ingest → binner → decoder.step → PUB, in one loop thread.

    daemon = Daemon(decoder=load_engine("exports/m1"), bin_s=0.02,
                    ingest="tcp://127.0.0.1:5555", publish="tcp://127.0.0.1:5556")
    daemon.start()                  # background thread; returns once bound and warm
    daemon.snapshot()               # counters + latency histograms (cheap, any thread)
    ticket = daemon.swap_decoder(new_engine); ticket.wait(5.0)   # → bin index it took effect at
    counts, velocity = daemon.recent_training_data(60.0)
    daemon.stop(); daemon.join()

The hot path is a straight line in the loop thread: ``recv`` → the message handlers
(:mod:`streaming.ingest`) → :class:`~streaming.binner.Binner` → ``decoder.step`` → ``PUB.send``.
Everything else hangs off it:

- Logging goes through :class:`~streaming.logsink.LogSink` (a queue and a writer thread), rate
  limited per reason.  Metrics are counters and fixed-size histograms that other threads copy
  (:meth:`Daemon.snapshot`); nothing is exported from the loop.
- The PUB socket never blocks: a slow or absent subscriber loses predictions at its own high-water
  mark (``publish_hwm``), the loop does not wait.
- Commands from other threads (:meth:`Daemon.swap_decoder`, :meth:`Daemon.reset`) are messages on a
  deque that the loop applies itself — a swap exactly at a bin boundary (:mod:`streaming.swap`).
- The ZeroMQ context and both sockets are created, used and closed by the loop thread only.

Decoder state is the decoder's: the daemon calls ``reset()`` before the first bin of every stream
(flag FIRST) and ``step(counts)`` once per bin, in order, for every bin of the stream.  All
daemon-side state is bounded (source table, kinematics pending map, history ring, histograms), so
hours of streaming grow neither memory nor per-bin time.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Callable

import numpy as np
import zmq

from rpnt_core.decoder import Decoder

from . import realtime
from .binner import Binner
from .history import HistoryRing
from .ingest import IngestHandlers
from .latency import STAGES, StageHistograms
from .logsink import LogSink
from .options import DECLARED, DaemonOptions, check_endpoint, max_jump_bins
from .protocol import PROTOCOL_VERSION, REJECT_REASONS
from .publish import BinPublisher
from .sources import SourceTable
from .swap import SwapTicket, warm_bins_for, warm_up
from .threads import LoopThread

_now = time.monotonic_ns
COUNTERS = (
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
)


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


def _checked_bin_ns(bin_s: float, info: Any, *, allow_mismatch: bool) -> int:
    """``bin_s`` in whole ns; ``ValueError`` if it is not, or differs from the decoder's unless allowed."""
    if not (isinstance(bin_s, (int, float)) and math.isfinite(bin_s) and bin_s > 0):
        raise ValueError(f"bin_s: must be a positive number of seconds, got {bin_s!r}")
    bin_ns = round(bin_s * 1e9)
    if bin_ns < 1 or abs(bin_ns - bin_s * 1e9) > 1e-3:
        raise ValueError(f"bin_s: {bin_s} s is not a whole number of nanoseconds")
    if abs(float(info.bin_s) - bin_s) > 1e-9 and not allow_mismatch:
        raise ValueError(
            f"bin width: the daemon bins at {bin_s * 1e3:g} ms but the decoder "
            f"{info.name or ''} was trained at {info.bin_s * 1e3:g} ms; use --bin-ms "
            f"{info.bin_s * 1e3:g} (or allow_bin_mismatch / --allow-bin-mismatch)"
        )
    return int(bin_ns)


class Daemon(IngestHandlers, BinPublisher, LoopThread):
    """The real-time decoding loop.  See the module docstring for the contract.

    Args:
        decoder: anything implementing :class:`rpnt_core.decoder.Decoder` (the ONNX Runtime engine
            from :func:`exporters.runtime.load_engine` in production).
        bin_s: bin width Δ in seconds (default: the decoder's ``info.bin_s``); a whole number of
            nanoseconds equal to the decoder's unless ``options.allow_bin_mismatch``.
        ingest: endpoint the PULL socket binds (spike events, ticks, counts, kinematics, control).
        publish: endpoint the PUB socket binds (predictions, PONGs).
        options: :class:`~streaming.options.DaemonOptions` (see :meth:`DaemonConfig.options
            <streaming.options.DaemonConfig.options>`).
        logger: where log lines go (default ``logging.getLogger("rpnt.streaming")``).
    Raises:
        ValueError: a bad bin width or endpoint.
    """

    def __init__(
        self,
        *,
        decoder: Decoder,
        bin_s: float | None = None,
        ingest: str = DECLARED.ingest,
        publish: str = DECLARED.publish,
        options: DaemonOptions | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__()
        self.options = opt = options or DaemonOptions()
        info = decoder.info
        bin_s = float(info.bin_s) if bin_s is None else bin_s
        self.bin_ns = _checked_bin_ns(bin_s, info, allow_mismatch=opt.allow_bin_mismatch)
        self.ingest = check_endpoint(ingest, allow_remote=opt.allow_remote)
        self.publish = check_endpoint(publish, allow_remote=opt.allow_remote)
        self.bin_s = float(bin_s)
        self.n_channels = int(info.n_channels)
        self.n_outputs = int(info.n_outputs)
        self.n_kinematics = int(opt.n_kinematics or info.n_outputs)
        self._limits = opt.limits
        self._stall_ns = int(round((opt.stall_timeout_s if opt.stall_timeout_s is not None else bin_s) * 1e9))
        self._generation = 0
        self._recorder = None
        self._use_decoder(decoder)
        self._init_state(logger)

    def _init_state(self, logger: logging.Logger | None) -> None:
        """The loop's state: binner, sources, history, recorder, counters, queues, log."""
        opt = self.options
        self._binner = Binner(
            n_channels=self.n_channels,
            bin_ns=self.bin_ns,
            emit=self._on_bin,
            max_jump_bins=max_jump_bins(max_jump_s=opt.max_jump_s, bin_ns=self.bin_ns),
        )
        self._sources = SourceTable(max_sources=opt.max_sources)
        self._history = HistoryRing(
            capacity=max(1, int(math.ceil(opt.history_s / self.bin_s))),
            n_channels=self.n_channels,
            n_kinematics=self.n_kinematics,
            max_pending=opt.max_pending_kinematics,
        )
        self._stages = StageHistograms(STAGES)
        if opt.record_s > 0:
            from .recording import SessionRecorder

            self._recorder = SessionRecorder(
                n_channels=self.n_channels,
                n_outputs=self.n_outputs,
                max_bins=max(1, int(math.ceil(opt.record_s / self.bin_s))),
            )
            self._recorder.add_version(1, model_version(self._decoder))
        self._c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._rejects: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self._swap_q: collections.deque[SwapTicket] = collections.deque()
        self._control_q: collections.deque[tuple] = collections.deque()
        self._swaps: collections.deque[dict] = collections.deque(maxlen=64)
        self._log = LogSink(logger=logger, interval_s=opt.log_interval_s)
        self._handlers = self._dispatch_table()
        self._t_recv = 0
        self._last_bin: int | None = None
        self._pub: zmq.Socket | None = None
        self._ready = threading.Event()
        self._running = False
        self._error: BaseException | None = None
        self._t_start_wall, self._t_start = time.time(), _now()
        self.startup: dict = {}
        self.endpoints: dict[str, str] = {"ingest": self.ingest, "publish": self.publish}
        self._adapters: dict[str, Callable[[], dict]] = {}

    def _use_decoder(self, decoder: Decoder) -> None:
        """Make ``decoder`` the live one (a new generation); the loop thread's only, once started."""
        self._decoder = decoder
        self._generation += 1
        self._version_bytes = model_version(decoder).encode()
        self._nan_bytes = np.full(int(decoder.info.n_outputs), np.nan, dtype=np.float32).tobytes()

    # ================================================================== lifecycle
    def start(self, timeout: float = 60.0) -> Daemon:
        """Run the loop in a background thread; return once the sockets are bound and the engine is warm.

        Raises:
            TimeoutError: not ready within ``timeout`` s.  RuntimeError: it failed to start.
        """
        self._start_thread(self._serve, name="rpnt-decode", what="daemon")
        if not self._ready.wait(timeout):
            raise TimeoutError(f"daemon did not become ready within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"daemon failed to start: {self._error}") from self._error
        return self

    @property
    def running(self) -> bool:
        return self._running

    def __enter__(self) -> Daemon:
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
            "rejected": {k: v for k, v in dict(self._rejects).items() if v},
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
        generation and the new model version.  Returns a :class:`~streaming.swap.SwapTicket`
        (``wait()`` → that bin).

        State: with ``warm`` (default) the new decoder is reset and run here, in the caller's thread,
        over the current stream's last ``warm_bins`` decoded bins (default: its receptive field − 1)
        from the history ring; at the boundary the loop feeds it the few bins decoded since
        (≤ ``swap_catchup_bins``).  Without ``warm`` — or when the history does not hold those
        bins, or the swap lands on a stream's first bin — it starts fresh (``reset()``).  The
        ticket's ``mode`` says which happened (:mod:`streaming.swap`).

        Raises:
            ValueError: the new decoder's channel count (or, unless allowed, bin width) differs.
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
        if warm:
            epoch, last, n_warm = warm_up(new_decoder, self._history, warm_bins_for(info, warm_bins))
        else:
            new_decoder.reset()
            epoch, last, n_warm = self._binner.epoch, None, 0
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
    def _serve(self) -> None:
        try:
            ctx, pull, pub = self._open()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            self._log.stop()
            return
        self._running = True
        self._ready.set()
        try:
            self._loop(pull)
        finally:
            self._running = False
            while self._swap_q:
                self._swap_q.popleft().resolve(error="daemon stopped before the swap took effect")
            pull.close(0)
            pub.close(0)
            self._pub = None
            ctx.term()
            self._log.stop()

    def _open(self) -> tuple[zmq.Context, zmq.Socket, zmq.Socket]:
        """Bind both sockets and apply the real-time habits (in the loop thread); on failure close
        what was opened and raise."""
        opt = self.options
        self._log.start()
        ctx = zmq.Context(io_threads=1)
        pull = pub = None
        try:
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RCVHWM, opt.ingest_hwm)
            pull.setsockopt(zmq.MAXMSGSIZE, opt.max_message_bytes)
            pull.bind(self.ingest)
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, opt.publish_hwm)
            pub.bind(self.publish)
            self.endpoints = {
                "ingest": pull.getsockopt_string(zmq.LAST_ENDPOINT),
                "publish": pub.getsockopt_string(zmq.LAST_ENDPOINT),
            }
            self._pub = pub
            self.startup = realtime.apply_habits(self._decoder, opt, n_channels=self.n_channels) | {
                "endpoints": dict(self.endpoints),
                "bin_ms": self.bin_ns / 1e6,
                "stall_timeout_ms": self._stall_ns / 1e6,
                "model": _info_dict(self._decoder),
            }
            self._t_start_wall, self._t_start = time.time(), _now()  # uptime counts from ready
            self._log.log(logging.INFO, f"rpnt daemon ready: {self.startup}")
        except BaseException:
            for s in (pull, pub):
                if s is not None:
                    s.close(0)
            ctx.term()
            raise
        return ctx, pull, pub

    def _loop(self, pull: zmq.Socket) -> None:
        stop, binner, handle = self._stop, self._binner, self._handle
        recv, poll = pull.recv_multipart, pull.poll
        max_batch, stall_ns = self.options.max_batch, self._stall_ns
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
                self._apply_controls(_now())
            if drained and dl is not None:
                self._close_stalled(max_batch)

    def _close_stalled(self, max_batch: int) -> None:
        """Nothing is waiting on the socket: bins past their due time close now, flagged STALLED
        (at most ``max_batch`` before the socket is looked at again)."""
        binner, stall_ns = self._binner, self._stall_ns
        for _ in range(max_batch):
            dl = binner.deadline_ns(stall_ns)
            now = _now()
            if dl is None or now < dl:
                return
            self._t_recv = now
            binner.close_stalled()

    def _prewarm(self) -> None:
        """The decoder's ``prewarm()`` ahead of a bin (see ``DaemonOptions.prewarm_lead_us``)."""
        fn = getattr(self._decoder, "prewarm", None)
        if fn is None:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failing warm-up must not stop the stream
            self._log.limited("prewarm_error", logging.ERROR, f"decoder.prewarm failed: {exc!r}")
