"""Real-time habits, each optional and each reporting what it did (the daemon prints them at start).

- :func:`pin_thread`: CPU affinity of the *calling thread* (Linux: ``sched_setaffinity(0, …)``
  applies to the calling thread), so the decode loop — and ONNX Runtime's intra-op work, which runs
  in the caller with one intra-op thread — stays on its core.
- :func:`rt_priority`: SCHED_FIFO for the calling thread (needs CAP_SYS_NICE / an rtprio limit).
- :func:`freeze_gc`: ``gc.collect()`` then ``gc.freeze()`` after warm-up: everything allocated so
  far moves to the permanent generation, so later collections only scan the few objects the loop
  allocates per bin.
- :func:`warm_up`: engine steps on zero counts before the first bin, then ``reset()``.

:func:`apply_habits` applies all of them as :class:`~streaming.options.DaemonOptions` asks.  Each
returns ``{"requested": …, "applied": bool, "detail": str}`` and never raises (a warm-up step
that fails raises: the daemon does not start on an engine that cannot step).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Iterable

import numpy as np


def pin_thread(cpus: Iterable[int] | int | None) -> dict:
    if cpus is None:
        return {"requested": None, "applied": False, "detail": "not requested"}
    want = {int(cpus)} if isinstance(cpus, int) else {int(c) for c in cpus}
    if not hasattr(os, "sched_setaffinity"):
        return {
            "requested": sorted(want),
            "applied": False,
            "detail": "os.sched_setaffinity unavailable here",
        }
    try:
        os.sched_setaffinity(0, want)
        got = sorted(os.sched_getaffinity(0))
        return {
            "requested": sorted(want),
            "applied": got == sorted(want),
            "detail": f"decode thread on CPUs {got}",
        }
    except OSError as exc:
        return {"requested": sorted(want), "applied": False, "detail": f"sched_setaffinity failed: {exc}"}


def rt_priority(priority: int | None) -> dict:
    if priority is None:
        return {"requested": None, "applied": False, "detail": "not requested"}
    if not hasattr(os, "sched_setscheduler"):
        return {"requested": priority, "applied": False, "detail": "os.sched_setscheduler unavailable here"}
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(int(priority)))
        return {"requested": priority, "applied": True, "detail": f"SCHED_FIFO priority {priority}"}
    except (OSError, ValueError) as exc:
        return {
            "requested": priority,
            "applied": False,
            "detail": f"SCHED_FIFO refused ({exc}); needs CAP_SYS_NICE or an rtprio limit",
        }


def freeze_gc(enabled: bool) -> dict:
    if not enabled:
        return {"requested": False, "applied": False, "detail": "not requested"}
    if not hasattr(gc, "freeze"):
        return {"requested": True, "applied": False, "detail": "gc.freeze unavailable"}
    gc.collect()
    gc.freeze()
    return {
        "requested": True,
        "applied": True,
        "detail": f"{gc.get_freeze_count()} objects frozen after warm-up",
    }


def warm_up(decoder: Any, *, n_bins: int, n_channels: int) -> dict:
    """``n_bins`` engine steps on zero counts, then ``reset()``: the first real bin runs on loaded
    weights and allocated buffers."""
    t0 = time.monotonic_ns()
    n = max(0, int(n_bins))
    if n:
        zero = np.zeros(n_channels, dtype=np.float32)  # (N,)
        for _ in range(n):
            decoder.step(zero)
    decoder.reset()
    detail = f"{n} engine steps in {(time.monotonic_ns() - t0) / 1e6:.1f} ms, then reset" if n else "skipped"
    return {"requested": n, "applied": n > 0, "detail": detail}


def apply_habits(decoder: Any, options: Any, *, n_channels: int) -> dict:
    """Every habit :class:`~streaming.options.DaemonOptions` asks for, in the calling thread (the
    decode loop's): pin, SCHED_FIFO, warm-up, gc freeze; and what busy-poll and prewarm will do.

    Returns:
        One report per habit (``affinity``, ``rt_priority``, ``warmup``, ``gc_freeze``,
        ``busy_poll``, ``prewarm``), as the module docstring says.
    """
    rep = {
        "affinity": pin_thread(options.affinity),
        "rt_priority": rt_priority(options.rt_priority),
        "warmup": warm_up(decoder, n_bins=options.warmup_bins, n_channels=n_channels),
        "gc_freeze": freeze_gc(options.gc_freeze),
    }
    spin = options.busy_poll_us
    rep["busy_poll"] = {
        "requested": spin,
        "applied": spin > 0,
        "detail": f"spins up to {spin} µs after each message before blocking"
        if spin > 0
        else "blocks in poll between messages",
    }
    rep["prewarm"] = {
        "requested_lead_us": options.prewarm_lead_us,
        "applied": options.prewarm_lead_us > 0 and hasattr(decoder, "prewarm"),
    }
    return rep
