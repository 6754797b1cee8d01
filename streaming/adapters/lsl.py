"""Lab Streaming Layer (``pylsl``, which bundles liblsl): an inlet bridge and a prediction outlet.

Ingest, ``lsl:NAME`` — the first LSL stream whose name is NAME, of one of two shapes (told apart by
its stream info; any other shape is refused once per stream as ``stream_format``):

- **spike events**: 1 channel, irregular rate (``nominal_srate`` 0), numeric.  Each sample is one
  event: the value is the channel id (0 … n_channels − 1) and the sample's LSL timestamp is the
  event's time.  The value −1 is a **clock tick**: every event earlier than its timestamp has been
  pushed (it closes bins as a native SPIKES clock / TICK does; push one at each bin end for the
  lowest latency, otherwise a bin closes with the next event after it or at the stall deadline).
- **binned counts**: n_channels channels at ``nominal_srate`` = 1/Δ (the daemon's bin rate).  Each
  sample is one bin's counts (integers 0 … 65535) stamped with the bin's start time.

Samples are forwarded as native SPIKES / COUNTS messages (one per pulled chunk, split at ticks).
A sample with a channel id outside [−1, n_channels), a count that is not an integer in range, a
time that is not finite or goes backwards is dropped and counted (``channel_range``,
``count_range``, ``time_range``, ``time_order``); the rest of its chunk goes on.

Clock mapping.  The daemon bins on the acquisition clock, in integer ns.  An LSL timestamp ``ts``
(seconds on the sender's ``local_clock``) becomes

    t_ns = round(ts · 10⁹) + offset_ns,   offset_ns = Δ · round(time_correction() · 10⁹ / Δ)

where ``time_correction()`` (measured once per connection) is the offset from the sender's LSL
clock to this host's.  The correction is applied in whole bins, so a sender that stamps its bin
ends exactly keeps them exactly (bins are never split by a fraction of the correction), and two
senders on different hosts land on one bin clock to within half a bin.  A reconnect re-measures
it and starts a new stream (native RESET): the decoder starts fresh rather than decode across a gap
of unknown length.  Counts samples are placed in bin ``round(t_ns / Δ)``.

Losses: liblsl does not tell a consumer how many samples it missed, so ``lost`` stays 0 for LSL;
an outlet that goes away is a ``disconnect`` (the inlet is opened with ``recover=False``), a new
outlet of the same name a ``reconnect``.

Publish, ``lsl:NAME`` — a regular outlet at 1/Δ of ``cf_double64`` samples
``[y_0 … y_{D−1}, flags, latency_ms, bin]``: the decoded target (float32 values, exact in double),
the PREDICTION flags, the daemon's latency for the bin (``t_publish − t_recv``, ms) and the bin
index; stamped with ``local_clock()`` when pushed.  Option ``type`` sets the stream type
(default ``rpnt-predictions``).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pylsl
from pylsl.util import LostError
from pylsl.util import TimeoutError as LslTimeout

from ..protocol import MAX_TIME_NS, Prediction, encode_counts, encode_spikes
from .base import Disconnected, IngestAdapter, PublishAdapter, Unavailable, latency_ns

TICK = -1
MAX_CHUNK = 4096


def clock_offset_ns(correction_s: float, bin_ns: int) -> int:
    """LSL ``time_correction()`` (s) → the offset added to every timestamp: whole bins, in ns."""
    if not math.isfinite(correction_s):
        return 0
    return round(correction_s * 1e9 / bin_ns) * bin_ns


def lsl_times_ns(ts: np.ndarray, offset_ns: int) -> np.ndarray:
    """LSL timestamps (s, float64) → bin-clock ns (int64); non-finite ones become −1."""
    ts = np.asarray(ts, dtype=np.float64)
    out = np.full(ts.shape, -1, dtype=np.int64)
    ok = np.isfinite(ts) & (np.abs(ts) < MAX_TIME_NS / 1e9)
    out[ok] = np.round(ts[ok] * 1e9).astype(np.int64) + offset_ns
    return out


class LslIngest(IngestAdapter):
    """``lsl:NAME`` (options ``resolve_s``: seconds per resolve attempt, default 1)."""

    kind = "lsl"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.resolve_s = self.spec.option("resolve_s", 1.0, float)
        self._inlet: pylsl.StreamInlet | None = None
        self._mode = ""
        self._offset_ns = 0
        self._last_t = -1  # latest event / tick time forwarded (ns)
        self._last_bin: int | None = None  # counts: latest bin forwarded
        self._refused: set[str] = set()

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        found = pylsl.resolve_byprop("name", self.spec.target, minimum=1, timeout=self.resolve_s)
        if not found:
            raise Unavailable(f"no LSL stream named {self.spec.target} (yet)")
        info = found[0]
        mode, why = self._shape(info)
        if mode is None:
            raise Unavailable(why)
        inlet = pylsl.StreamInlet(info, max_buflen=360, recover=False)
        try:
            inlet.open_stream(timeout=max(1.0, self.resolve_s))
            correction = inlet.time_correction(timeout=5.0)
        except (LostError, LslTimeout) as exc:
            inlet.close_stream()
            raise Unavailable(f"LSL stream {self.spec.target}: {exc}") from None
        self._inlet, self._mode = inlet, mode
        self._offset_ns = clock_offset_ns(correction, self.bin_ns)
        self._last_t, self._last_bin = -1, None
        self.stats.extra.update(mode=mode, time_correction_s=correction, clock_offset_ns=self._offset_ns)

    def _shape(self, info: pylsl.StreamInfo) -> tuple[str | None, str]:
        """("spikes" | "counts", "") or (None, why); a refused stream is counted once (``stream_format``)."""
        n, rate, fmt = info.channel_count(), info.nominal_srate(), info.channel_format()
        if fmt != pylsl.cf_string and n == 1 and rate == pylsl.IRREGULAR_RATE:
            return "spikes", ""
        if (
            fmt != pylsl.cf_string
            and n == self.n_channels
            and rate > 0
            and abs(rate * self.bin_ns / 1e9 - 1) < 1e-6
        ):
            return "counts", ""
        kind = "text" if fmt == pylsl.cf_string else "numeric"
        why = (
            f"LSL stream {info.name()}: {n} {kind} channel(s) at {rate:g} Hz; expected 1 numeric channel at "
            f"irregular rate (spike events) or {self.n_channels} at {1e9 / self.bin_ns:g} Hz (binned counts)"
        )
        if info.uid() not in self._refused:
            self._refused.add(info.uid())
            self.stats.reject("stream_format", detail=why)
        return None, why

    def _close_foreign(self) -> None:
        if self._inlet is not None:
            with contextlib.suppress(Exception):  # a lost stream may refuse to close: it is gone either way
                self._inlet.close_stream()
            self._inlet = None

    # ------------------------------------------------------------------ data
    def _poll(self, timeout_s: float) -> None:
        try:
            # liblsl's pull_chunk waits out its whole timeout unless the chunk fills: block on the
            # first sample only, then take whatever else is already there
            first, t_first = self._inlet.pull_sample(timeout=timeout_s)
            if first is None:
                return
            samples, ts = self._inlet.pull_chunk(timeout=0.0, max_samples=MAX_CHUNK - 1)
        except LostError:
            raise Disconnected(f"LSL stream {self.spec.target} was lost") from None
        samples, ts = [first, *samples], [t_first, *ts]
        self.stats.received += len(ts)
        values = np.asarray(samples, dtype=np.float64).reshape(len(ts), -1)
        t_ns = lsl_times_ns(np.asarray(ts), self._offset_ns)
        if self._mode == "spikes":
            self._forward_spikes(values[:, 0], t_ns)
        else:
            self._forward_counts(values, t_ns)

    def _in_order(self, t_ns: np.ndarray, last: int) -> np.ndarray:
        """Mask of samples whose time is in range and not earlier than any before it (or ``last``)."""
        ok = (t_ns >= 0) & (t_ns <= MAX_TIME_NS)
        self._drop(~ok, "time_range", "timestamp not finite or out of range")
        prev = np.maximum.accumulate(np.concatenate(([last], np.where(ok, t_ns, -1))))[:-1]
        late = ok & (t_ns < prev)
        self._drop(late, "time_order", "timestamp earlier than one already forwarded")
        return ok & ~late

    def _drop(self, bad: np.ndarray, reason: str, detail: str) -> None:
        n = int(bad.sum())
        if n:
            self.stats.reject(reason, n, detail)

    def _forward_spikes(self, ids: np.ndarray, t_ns: np.ndarray) -> None:
        valid = np.isfinite(ids) & (ids == np.round(ids)) & (ids >= TICK) & (ids < self.n_channels)
        self._drop(~valid, "channel_range", f"channel id outside [-1, {self.n_channels})")
        keep = valid & self._in_order(t_ns, self._last_t)
        ids, t_ns = ids[keep].astype(np.int64), t_ns[keep]
        if not ids.size:
            return
        self._last_t = int(t_ns[-1])
        start = 0
        for i in np.flatnonzero(ids == TICK).tolist() + [ids.size]:
            ch, tm = ids[start:i], t_ns[start:i]
            clock = int(t_ns[i]) if i < ids.size else None
            if ch.size or clock is not None:
                self.send(
                    encode_spikes(
                        source=self.source_id, seq=self.next_seq(), channels=ch, times=tm, clock=clock
                    )
                )
            start = i + 1

    def _forward_counts(self, values: np.ndarray, t_ns: np.ndarray) -> None:
        good = (
            np.isfinite(values).all(1)
            & (values == np.round(values)).all(1)
            & (values >= 0).all(1)
            & (values <= 65535).all(1)
        )
        self._drop(~good, "count_range", "counts must be integers in [0, 65535]")
        last = -1 if self._last_bin is None else self._last_bin * self.bin_ns
        keep = good & self._in_order(t_ns, last)
        bins = (t_ns[keep] + self.bin_ns // 2) // self.bin_ns
        rows = values[keep]
        fresh = bins > (-1 if self._last_bin is None else self._last_bin)
        fresh[1:] &= bins[1:] > bins[:-1]
        self._drop(~fresh, "time_order", "a second sample for a bin already forwarded")
        bins, rows = bins[fresh], rows[fresh]
        if not bins.size:
            return
        cuts = np.flatnonzero(np.diff(bins) != 1) + 1
        for b, r in zip(np.split(bins, cuts), np.split(rows, cuts), strict=True):
            self.send(
                encode_counts(
                    source=self.source_id,
                    seq=self.next_seq(),
                    first=int(b[0]),
                    counts=r.astype(np.uint16),
                    bin_ns=self.bin_ns,
                )
            )
        self._last_bin = int(bins[-1])


class LslPublish(PublishAdapter):
    """``lsl:NAME``: predictions as a regular LSL stream (see the module docstring)."""

    kind = "lsl"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._outlet: pylsl.StreamOutlet | None = None

    def channel_labels(self) -> list[str]:
        return [f"y{i}" for i in range(self.n_outputs)] + ["flags", "latency_ms", "bin"]

    def _connect(self) -> None:
        labels = self.channel_labels()
        info = pylsl.StreamInfo(
            self.spec.target,
            self.spec.options.get("type", "rpnt-predictions"),
            len(labels),
            1e9 / self.bin_ns,
            pylsl.cf_double64,
            f"rpnt-{self.spec.target}",
        )
        chans = info.desc().append_child("channels")
        for label in labels:
            chans.append_child("channel").append_child_value("label", label)
        self._outlet = pylsl.StreamOutlet(info)

    def emit(self, p: Prediction) -> None:
        row = np.empty(self.n_outputs + 3, dtype=np.float64)
        d = min(self.n_outputs, p.velocity.shape[0])
        row[: self.n_outputs] = np.nan
        row[:d] = p.velocity[:d]
        row[self.n_outputs :] = (p.flags, latency_ns(p) / 1e6, p.bin)
        self._outlet.push_sample(row.tolist())

    def _close_foreign(self) -> None:
        self._outlet = None  # liblsl closes the outlet when it is released
