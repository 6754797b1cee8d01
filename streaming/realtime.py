"""Real-time habits, each optional and each reporting what it did (the daemon prints them at start).

- :func:`pin_thread`: CPU affinity of the *calling thread* (Linux: ``sched_setaffinity(0, …)``
  applies to the calling thread), so the decode loop — and ONNX Runtime's intra-op work, which runs
  in the caller with one intra-op thread — stays on its core.
- :func:`rt_priority`: SCHED_FIFO for the calling thread (needs CAP_SYS_NICE / an rtprio limit).
- :func:`freeze_gc`: ``gc.collect()`` then ``gc.freeze()`` after warm-up: everything allocated so
  far moves to the permanent generation, so later collections only scan the few objects the loop
  allocates per bin.

Each returns ``{"requested": …, "applied": bool, "detail": str}`` and never raises.
"""

from __future__ import annotations

import gc
import os
from typing import Iterable


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
