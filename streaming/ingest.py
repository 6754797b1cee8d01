"""The message half of the daemon's loop: one ingest message → checks → the binner.

``recv`` → :func:`~streaming.protocol.read_header` → sequence accounting →
:func:`~streaming.protocol.parse_body` → one handler per message kind (one dispatch table, keyed by
the header's plain-int type) → per-source time checks → :class:`~streaming.binner.Binner`.

Bad input never stops the loop: each rejected message is counted under its reason
(:data:`~streaming.protocol.REJECT_REASONS`) and logged at most once per ``log_interval_s`` per
reason; the next prediction carries the REJECTED flag.

:class:`IngestHandlers` is mixed into :class:`~streaming.daemon.Daemon`, whose loop thread alone
calls it; the attributes annotated on the class are the daemon state it reads and writes.
"""

from __future__ import annotations

import collections
import logging
import traceback
from collections.abc import Callable
from typing import Any

import zmq

from .binner import Binner
from .history import HistoryRing
from .logsink import LogSink
from .options import DaemonOptions
from .protocol import (
    MAX_TIME_NS,
    IngestMessage,
    Limits,
    MsgType,
    PredFlag,
    ProtocolError,
    encode_pong,
    parse_body,
    read_header,
)
from .sources import DUPLICATE, SourceTable

_GAP, _REJECTED = int(PredFlag.GAP), int(PredFlag.REJECTED)

Handler = Callable[[IngestMessage, int], None]


class IngestHandlers:
    """Header, sequence accounting and one handler per message kind (see the module docstring)."""

    options: DaemonOptions
    n_channels: int
    n_kinematics: int
    bin_ns: int
    _limits: Limits
    _binner: Binner
    _sources: SourceTable
    _history: HistoryRing
    _recorder: Any
    _log: LogSink
    _pub: zmq.Socket | None
    _c: dict[str, int]
    _rejects: dict[str, int]
    _control_q: collections.deque[tuple]
    _t_recv: int
    _handlers: dict[int, Handler]
    status: Callable[[], dict]

    def _dispatch_table(self) -> dict[int, Handler]:
        """The handler of each message kind, keyed by the plain-int type of the header."""
        return {
            int(MsgType.SPIKES): self._on_spikes,
            int(MsgType.TICK): self._on_tick,
            int(MsgType.COUNTS): self._on_counts,
            int(MsgType.KINEMATICS): self._on_kinematics,
            int(MsgType.RESET): self._on_reset,
            int(MsgType.PING): self._on_ping,
        }

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
            msg = parse_body(head, frames, self._limits)  # before the lookup: an unknown type is msg_type
            self._handlers[head[2]](msg, t_recv)
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

    def _apply_controls(self, now_ns: int) -> None:
        """Commands queued by other threads (:meth:`~streaming.daemon.Daemon.reset`), in order."""
        while self._control_q:
            cmd = self._control_q.popleft()
            if cmd[0] == "reset":
                self._do_reset(cmd[1], cmd[2], now_ns)
