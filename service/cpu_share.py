"""How much CPU a child process gets: the calibration monitor's starvation signal.

:class:`CpuShare` is pure (no I/O): feed it ``(wall_s, cpu_s)`` samples and it answers the share
of one core the process got over the last ``window_s`` seconds.  :func:`process_cpu_seconds`
reads a process's user + system CPU time from ``/proc`` (Linux); elsewhere it answers ``None`` and
the job simply reports no share.
"""

from __future__ import annotations

import os
from collections import deque

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") and "SC_CLK_TCK" in os.sysconf_names else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, or None (no /proc, or it has exited)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat(5))
    except (IndexError, ValueError):
        return None


class CpuShare:
    """Share of one core over a sliding window of ``(wall_s, cpu_s)`` samples.

    Args:
        window_s: the span the share is measured over; :meth:`share` is None until the samples cover it.
    """

    def __init__(self, *, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = float(window_s)
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, wall_s: float, cpu_s: float) -> None:
        """Record one sample; keeps only what the window needs (one sample older than it)."""
        self._samples.append((float(wall_s), float(cpu_s)))
        while len(self._samples) > 2 and self._samples[1][0] <= wall_s - self.window_s:
            self._samples.popleft()

    def share(self) -> float | None:
        """CPU seconds per wall second since the oldest sample kept, once that spans ≥ ``window_s``."""
        if len(self._samples) < 2:
            return None
        (w0, c0), (w1, c1) = self._samples[0], self._samples[-1]
        if w1 - w0 < self.window_s:
            return None
        return max(0.0, (c1 - c0) / (w1 - w0))
