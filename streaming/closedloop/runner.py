"""The closed loop, in real time, through the real daemon: participant → spikes → ZeroMQ → decoder →
PUB → cursor → what the participant sees.

:class:`ClosedLoop` runs in its own thread (its own sockets).  Every 20 ms bin, paced by the wall
clock: the participant's intention for the bin becomes spike events
(:class:`~streaming.closedloop.participant.Participant`) sent with the protocol's SPIKES message
whose clock closes the bin; the daemon decodes it and publishes a PREDICTION; predictions are
applied to the cursor ``extra_latency_s`` after they arrive (0 = at once); the task records the
cursor; the controller looks at the cursor (seen ``feedback_delay_s`` late) and forms the next
intention.  With ``labels`` set, each applied bin's label goes back to the daemon as KINEMATICS
for ``POST /calibrate source=recent``: ``refit`` (the ReFIT rule, :mod:`.refit`), ``intended``
(the true intention, which a clinic never has) or ``decoded``.  ``mode="observe"`` moves the
cursor by the intention itself (an open-loop observation block) while the daemon still decodes.

Everything random is seeded (participant, task, controller, spike times), so a run is replayable;
what can differ between two runs of one seed is only *when* predictions arrive (the machine's
load), which the loop records per bin (``recv_lag_s``).  A bin is *lost* when its prediction
never arrives; the loop counts them exactly by bin index after a final drain.

The loop may be changed while it runs, from another thread: :meth:`ClosedLoop.set_encoding`
(drift: the new encoding applies from the next bin) and :meth:`ClosedLoop.stop` (end early).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from ..client import PredictionSubscriber, RigClient, wait_for_daemon
from ..protocol import PredFlag, Prediction
from .controller import Controller, ControllerConfig
from .metrics import summarise, trial_metrics
from .participant import EncodingModel, Participant
from .refit import refit_labels
from .task import Task, TaskConfig

LABEL_KINDS = ("refit", "intended", "decoded")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """One closed-loop block: how long, at which bin width, how the cursor moves, what goes back."""

    seconds: float = 60.0
    bin_s: float = 0.02
    extra_latency_s: float = 0.0
    mode: str = "closed"  # "closed": the decoder moves the cursor; "observe": the intention does
    labels: str | None = "refit"  # KINEMATICS sent back per applied bin: one of LABEL_KINDS, or None
    seed: int = 0
    source_id: int = 0x434C4F50  # "CLOP"
    drain_s: float = 3.0

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "observe"):
            raise ValueError(f"mode: expected 'closed' or 'observe', got {self.mode!r}")
        if self.labels is not None and self.labels not in LABEL_KINDS:
            raise ValueError(f"labels: expected one of {LABEL_KINDS} or None, got {self.labels!r}")
        if not (self.seconds > 0 and self.bin_s > 0 and self.extra_latency_s >= 0):
            raise ValueError("seconds and bin_s must be > 0, extra_latency_s ≥ 0")


class BinRecord:
    """Per-bin arrays of one block (K bins).  ``decoded[k]`` is NaN for a lost bin; the ``*_at_apply``
    arrays are the cursor and target when bin k's prediction moved the cursor (what ReFIT uses)."""

    def __init__(self, n_bins: int, n_channels: int) -> None:
        self.counts = np.zeros((n_bins, n_channels), dtype=np.uint16)
        self.intent = np.zeros((n_bins, 2))
        self.decoded = np.full((n_bins, 2), np.nan)
        self.cursor = np.zeros((n_bins, 2))  # after bin k's iteration
        self.target = np.zeros((n_bins, 2))
        self.cursor_at_apply = np.full((n_bins, 2), np.nan)
        self.target_at_apply = np.full((n_bins, 2), np.nan)
        self.generation = np.full(n_bins, -1, dtype=np.int64)
        self.flags = np.zeros(n_bins, dtype=np.int64)
        self.recv_lag_s = np.full(n_bins, np.nan)  # prediction received − bin end (wall clock)
        self.received = np.zeros(n_bins, dtype=bool)
        self.overrun = np.zeros(n_bins, dtype=bool)  # this iteration started > 1 bin late (host busy)
        self.encoding_stage = np.zeros(n_bins, dtype=np.int64)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` bins (a block stopped early)."""
        for name, value in list(vars(self).items()):
            setattr(self, name, value[:n])


class ClosedLoop:
    """See the module docstring.  ``start()`` → thread; ``join()``; then ``record``, ``trials``, ``summary()``."""

    def __init__(
        self,
        *,
        ingest: str,
        publish: str,
        encoding: EncodingModel,
        task: TaskConfig,
        controller: ControllerConfig,
        config: LoopConfig,
        radius_for_labels: float | None = None,
    ) -> None:
        self.ingest, self.publish = ingest, publish
        self.config = config
        c = config
        self.n_bins = int(round(c.seconds / c.bin_s))
        self.bin_ns = int(round(c.bin_s * 1e9))
        self.participant = Participant(encoding=encoding, seed=c.seed)
        self.task = Task(config=task, seed=c.seed + 1)
        self.controller = Controller(config=controller, bin_s=c.bin_s, seed=c.seed + 2)
        self._spike_rng = np.random.default_rng(c.seed + 3)
        self.record = BinRecord(self.n_bins, encoding.n_channels)
        self.k = 0  # bins sent so far (read by other threads)
        self._cursor = np.zeros(2)  # the cursor now (owned by the loop's thread)
        self._intent = np.zeros(2)  # the intention for the next bin
        self._stage = 0
        self._new_encoding: EncodingModel | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.daemon_status: dict = {}
        self.finished = threading.Event()
        self._stop = threading.Event()

    # ---------------------------------------------------------------- control from other threads
    def set_encoding(self, encoding: EncodingModel) -> None:
        """Drift: the participant encodes with ``encoding`` from the next bin."""
        with self._lock:
            self._new_encoding = encoding

    def stop(self) -> None:
        """End the block early, after the bin being sent (its length becomes the bins sent)."""
        self._stop.set()

    @property
    def elapsed_s(self) -> float:
        return self.k * self.config.bin_s

    def start(self) -> "ClosedLoop":
        self._thread = threading.Thread(target=self._run_guarded, name="closedloop", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"closed loop failed: {self.error}") from self.error

    def run(self) -> "ClosedLoop":
        """Run in the calling thread."""
        self._run()
        return self

    # ---------------------------------------------------------------- the loop
    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc
        finally:
            self.finished.set()

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        rig = RigClient(endpoint=self.ingest, source_id=self.config.source_id, context=ctx)
        sub = PredictionSubscriber(endpoint=self.publish, context=ctx, predictions_only=False)
        try:
            self.daemon_status = wait_for_daemon(rig, sub, timeout=60.0)
            self._check_daemon(self.daemon_status)
            rig.send_reset(start=0)
            self._loop(rig, sub, epoch=int(self.daemon_status.get("epoch", 0)) + 1)
        finally:
            rig.close()
            sub.close()

    def _check_daemon(self, st: dict) -> None:
        if int(st.get("bin_ns", -1)) != self.bin_ns:
            raise RuntimeError(f"the daemon bins at {st.get('bin_ns')} ns, the loop at {self.bin_ns} ns")
        if int(st.get("n_channels", -1)) != self.participant.encoding.n_channels:
            raise RuntimeError(
                f"the daemon's model takes {st.get('n_channels')} channels, the participant has "
                f"{self.participant.encoding.n_channels}"
            )

    def _loop(self, rig: RigClient, sub: PredictionSubscriber, *, epoch: int) -> None:
        """``epoch``: the stream number our RESET starts (a previous stream's late predictions are ignored)."""
        c = self.config
        pending: list[tuple[float, int, np.ndarray]] = []  # (apply at, bin, velocity)
        self._begin()
        t0 = time.monotonic()
        for k in range(self.n_bins):
            if self._stop.is_set():
                self._truncate(k)
                break
            counts = self._emit(k)
            # the bin [k, k+1) is "recorded" in real time: send it when its end comes
            end_wall = t0 + (k + 1) * c.bin_s
            lag = time.monotonic() - end_wall
            if lag < 0:
                time.sleep(-lag)
            self.record.overrun[k] = lag > c.bin_s
            ch, ts = Participant.spike_times(
                counts, start_ns=k * self.bin_ns, bin_ns=self.bin_ns, rng=self._spike_rng
            )
            rig.send_spikes(ch, ts, clock=(k + 1) * self.bin_ns)
            self.k = k + 1
            # wait for this bin's prediction for up to 80 % of a bin, take whatever else came
            pending += self._collect(sub, k, epoch=epoch, t0=t0, deadline=end_wall + 0.8 * c.bin_s)
            now = time.monotonic()
            for _, b, v in sorted((p for p in pending if p[0] <= now), key=lambda p: p[0]):
                self._apply(b, v, rig)  # what is due, oldest first
            pending = [p for p in pending if p[0] > now]
            self._end_bin(k)
        self._drain(sub, epoch, t0)

    # ---------------------------------------------------------------- one bin, in steps
    def _begin(self) -> None:
        """The block's first trial, and the intention for bin 0."""
        self._cursor = np.zeros(2)
        self.task.start(0.0)
        self.participant.new_trial()
        self.controller.observe(self._cursor)
        self._intent = self.controller.intent(self.task.target)

    def _truncate(self, k: int) -> None:
        """The block ends after ``k`` bins (stopped early)."""
        self.n_bins = k
        self.record.truncate(k)

    def _emit(self, k: int) -> np.ndarray:
        """Bin k's counts (N,) from the current intention (a pending drift applies first); recorded."""
        with self._lock:
            if self._new_encoding is not None:
                self.participant.encoding, self._new_encoding = self._new_encoding, None
                self._stage += 1
        rec = self.record
        rec.encoding_stage[k] = self._stage
        counts = self.participant.counts(self._intent, self.config.bin_s)
        rec.counts[k], rec.intent[k] = np.minimum(counts, 65535), self._intent
        return counts

    def _receive(self, m: Any, *, epoch: int, t0: float) -> bool:
        """Record ``m`` if it is a prediction of this stream not seen before; whether it was."""
        rec = self.record
        if not isinstance(m, Prediction) or m.epoch != epoch or not 0 <= m.bin < self.n_bins:
            return False
        if rec.received[m.bin]:
            return False
        rec.received[m.bin], rec.flags[m.bin], rec.generation[m.bin] = True, m.flags, m.generation
        rec.decoded[m.bin] = m.velocity[:2]
        rec.recv_lag_s[m.bin] = time.monotonic() - (t0 + (m.bin + 1) * self.config.bin_s)
        return True

    def _collect(
        self, sub: PredictionSubscriber, k: int, *, epoch: int, t0: float, deadline: float
    ) -> list[tuple[float, int, np.ndarray]]:
        """Predictions received until bin k's arrives or ``deadline``: (apply at, bin, velocity (2,)) each."""
        out = []
        while True:
            m = sub.recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                break
            if not self._receive(m, epoch=epoch, t0=t0):
                continue
            out.append((time.monotonic() + self.config.extra_latency_s, m.bin, self.record.decoded[m.bin]))
            if m.bin >= k:
                break
        return out

    def _apply(self, b: int, velocity: np.ndarray, rig: RigClient | None) -> None:
        """Bin b's decoded ``velocity`` (2,) moves the cursor (closed mode); its label goes to ``rig``."""
        rec = self.record
        rec.cursor_at_apply[b], rec.target_at_apply[b] = self._cursor, self.task.target
        if self.config.mode == "closed":
            v = np.asarray(velocity[:2], dtype=np.float64)
            if np.all(np.isfinite(v)):
                self._cursor = self.task.clamp(self._cursor + v * self.config.bin_s)
        if rig is not None:
            self._send_label(rig, b)

    def _end_bin(self, k: int) -> None:
        """The task sees the cursor at bin k's end; the participant looks and forms bin k+1's intention."""
        if self.config.mode == "observe":
            self._cursor = self.task.clamp(self._cursor + self._intent * self.config.bin_s)
        self.record.target[k] = self.task.target
        ended = self.task.update((k + 1) * self.config.bin_s, self._cursor)
        self.record.cursor[k] = self._cursor
        if ended is not None:
            self.participant.new_trial()
        self.controller.observe(self._cursor)
        self._intent = self.controller.intent(self.task.target)

    def simulate(self, decoder: Any) -> "ClosedLoop":
        """The same block in this thread, without sockets or a clock: ``decoder`` (the decoder
        contract of :mod:`rpnt_core.decoder`) decodes each bin as it is emitted and its prediction
        moves the cursor in that bin (a daemon that answers within the bin), or ``extra_latency_s``
        rounded to whole bins later.  For quick comparisons and diagnosis, not a measurement of the
        live loop: nothing goes through the daemon and no labels are streamed."""
        delay = int(round(self.config.extra_latency_s / self.config.bin_s))
        due: deque[tuple[int, int]] = deque()  # (apply at bin, bin)
        rec = self.record
        decoder.reset()
        self._begin()
        for k in range(self.n_bins):
            v = np.asarray(decoder.step(self._emit(k)), dtype=np.float64)[:2]
            rec.received[k], rec.decoded[k], rec.recv_lag_s[k] = True, v, 0.0
            due.append((k + delay, k))
            while due and due[0][0] <= k:
                b = due.popleft()[1]
                self._apply(b, rec.decoded[b], None)
            self.k = k + 1
            self._end_bin(k)
        return self

    def _send_label(self, rig: RigClient, b: int) -> None:
        rec, kind = self.record, self.config.labels
        if kind is None:
            return
        if kind == "refit":
            lab = refit_labels(
                decoded=rec.decoded[b : b + 1],
                cursor=rec.cursor_at_apply[b : b + 1],
                target=rec.target_at_apply[b : b + 1],
                radius=self.task.config.radius,
            )[0]
        elif kind == "intended":
            lab = rec.intent[b]
        else:
            lab = rec.decoded[b]
        if np.all(np.isfinite(lab)):
            rig.send_kinematics(b, np.asarray(lab, dtype=np.float32)[None, :])

    def _drain(self, sub: PredictionSubscriber, epoch: int, t0: float) -> None:
        deadline = time.monotonic() + self.config.drain_s
        while not self.record.received.all() and time.monotonic() < deadline:
            m = sub.recv(max(0.0, deadline - time.monotonic()))
            if m is not None:
                self._receive(m, epoch=epoch, t0=t0)

    # ---------------------------------------------------------------- results
    @property
    def bins_lost(self) -> int:
        return int((~self.record.received).sum())

    def trial_rows(self) -> list[dict]:
        """Per-trial metrics (:func:`~streaming.closedloop.metrics.trial_metrics`) + when and under which
        decoder generation each ran."""
        rows = []
        radius = self.task.config.radius
        for tr in self.task.trials:
            m = trial_metrics(
                times=np.asarray(tr.times),
                path=np.asarray(tr.path),
                target=tr.target,
                radius=radius,
                start_t=tr.start_t,
                end_t=tr.end_t,
                success=tr.success,
            )
            k0 = min(int(round(tr.start_t / self.config.bin_s)), self.n_bins - 1)
            k1 = min(int(round(tr.end_t / self.config.bin_s)), self.n_bins) - 1
            gens = self.record.generation[k0 : k1 + 1]
            gens = gens[gens >= 0]
            rows.append(
                {
                    "trial": tr.index,
                    "target": [round(float(x), 3) for x in tr.target],
                    "start_s": round(tr.start_t, 3),
                    "end_s": round(tr.end_t, 3),
                    "generation": int(gens.max()) if gens.size else None,
                    "encoding_stage": int(self.record.encoding_stage[k0]),
                    **m,
                }
            )
        return rows

    def swaps(self) -> list[int]:
        """Bins the daemon flagged SWAPPED (the first bin each new decoder decoded)."""
        return [int(b) for b in np.flatnonzero((self.record.flags & int(PredFlag.SWAPPED)) != 0)]

    def summary(self) -> dict:
        rec = self.record
        lag = rec.recv_lag_s[np.isfinite(rec.recv_lag_s)]
        out = summarise(self.trial_rows())
        out.update(
            bins=self.n_bins,
            bins_lost=self.bins_lost,
            swaps=self.swaps(),
            loop_overruns=int(rec.overrun.sum()),
            recv_lag_ms={
                "median": float(np.median(lag) * 1e3) if lag.size else None,
                "p99": float(np.percentile(lag, 99) * 1e3) if lag.size else None,
            },
            extra_latency_ms=self.config.extra_latency_s * 1e3,
        )
        return out

    def refit_streams(self, lo: int = 0, hi: int | None = None) -> dict:
        """The task streams of bins [lo, hi) with a prediction, in the NPZ layout of a ``labels=refit``
        upload (``extra_task_*``), with the counts."""
        rec = self.record
        sl = slice(lo, self.n_bins if hi is None else hi)
        ok = rec.received[sl] & np.all(np.isfinite(rec.cursor_at_apply[sl]), axis=1)
        return {
            "counts": rec.counts[sl][ok],
            "extra_task_decoded": rec.decoded[sl][ok],
            "extra_task_cursor": rec.cursor_at_apply[sl][ok],
            "extra_task_target": rec.target_at_apply[sl][ok],
            "extra_task_radius": np.float64(self.task.config.radius),
        }


def simulate_observation(
    *,
    encoding: EncodingModel,
    task: TaskConfig,
    controller: ControllerConfig,
    seconds: float,
    bin_s: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """An open-loop observation block without a decoder (as in clinical calibration, the cursor
    moves by the participant's intention): (counts (T, N), intended velocity (T, 2)), seeded.
    No sockets and no real time: nothing here is decoded."""
    part = Participant(encoding=encoding, seed=seed)
    tk = Task(config=task, seed=seed + 1)
    ctl = Controller(config=controller, bin_s=bin_s, seed=seed + 2)
    T = int(round(seconds / bin_s))
    counts = np.zeros((T, encoding.n_channels), dtype=np.int64)
    intent = np.zeros((T, 2))
    cursor = np.zeros(2)
    tk.start(0.0)
    part.new_trial()
    ctl.observe(cursor)
    for k in range(T):
        v = ctl.intent(tk.target)
        counts[k], intent[k] = part.counts(v, bin_s), v
        cursor = tk.clamp(cursor + v * bin_s)
        if tk.update((k + 1) * bin_s, cursor) is not None:
            part.new_trial()
        ctl.observe(cursor)
    return counts, intent
