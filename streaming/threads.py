"""One background thread with a stop flag: what the daemon and every adapter bridge share."""

from __future__ import annotations

import threading
from collections.abc import Callable


class LoopThread:
    """Owns one daemon thread running a loop that watches ``self._stop``.

    :meth:`_start_thread` starts it (once); :meth:`stop` asks the loop to finish; :meth:`join` waits.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _start_thread(self, target: Callable[[], None], *, name: str, what: str) -> None:
        """Start ``target`` in a daemon thread called ``name``; ``what`` names this owner in the
        error for a second start (``RuntimeError``)."""
        if self._thread is not None:
            raise RuntimeError(f"{what} already started")
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to finish (it exits within one poll interval)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; returns whether it has exited (True if it never started)."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
