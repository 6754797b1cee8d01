"""Logging off the hot path: the loop enqueues, a background thread writes; rate-limited per key.

The loop thread never formats through handlers or touches a file: :meth:`LogSink.log` puts a
``(level, message)`` tuple on a queue (no formatting, no I/O), and a daemon thread hands it to
:mod:`logging`.  :meth:`LogSink.limited` lets one line per key through per ``interval_s``
and appends how many were suppressed in between, so a flood of bad packets costs a counter
increment each, not a log line each.  Keys must come from a fixed set (e.g. reject reasons),
never from packet contents, so the limiter's table stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

_STOP = object()


class LogSink:
    """Queue + writer thread in front of a :class:`logging.Logger`."""

    def __init__(
        self, *, logger: logging.Logger | None = None, interval_s: float = 5.0, max_detail: int = 200
    ) -> None:
        self.logger = logger or logging.getLogger("rpnt.streaming")
        self.interval_s = float(interval_s)
        self.max_detail = int(max_detail)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._last: dict[str, list] = {}  # key → [last emitted (monotonic s), suppressed since]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rpnt-log", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def log(self, level: int, msg: str) -> None:
        """Enqueue one line (the writer thread emits it; before start() it is emitted on start)."""
        self._q.put((level, msg))

    def limited(self, key: str, level: int, msg: str) -> bool:
        """Enqueue ``msg`` unless a line for ``key`` went out less than ``interval_s`` ago; returns
        whether it was enqueued."""
        now = time.monotonic()
        st = self._last.get(key)
        if st is not None and now - st[0] < self.interval_s:
            st[1] += 1
            return False
        if len(msg) > self.max_detail:
            msg = msg[: self.max_detail] + "…"
        if st is not None and st[1]:
            msg = f"{msg} ({st[1]} more like this in the last {now - st[0]:.0f} s)"
        self._last[key] = [now, 0]
        self._q.put((level, msg))
        return True

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            level, msg = item
            with contextlib.suppress(Exception):  # a broken handler must not kill the writer
                self.logger.log(level, msg)
