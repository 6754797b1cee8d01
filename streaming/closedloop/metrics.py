"""Closed-loop metrics, from trial records alone (pure functions; no sockets, no clocks).

Per trial (:func:`trial_metrics`), with ``D`` the distance from the trial's first cursor sample to
the target centre and ``W = 2·radius`` the target width:

- ``time_to_target_s``: from the trial start to the last entry into the target (the entry whose
  hold succeeded; excludes the hold itself).  Successful trials only.
- ``dial_in_s``: from the first entry into the target to that last entry (0 when the first entry
  held): time lost re-acquiring after overshooting.
- ``path_efficiency``: ``max(D − radius, 0)`` over the path length travelled until the first entry
  (1 = straight to the target edge).
- ``fitts_id_bits``: ``log2((D + W) / W)`` (Fitts' index of difficulty, Shannon form).

Over a run (:func:`summarise`): success rate, median time to target, median dial-in, median path
efficiency, and Fitts' bitrate = the index of difficulty of the *successful* trials summed,
divided by the time all trials took (failures spend time and earn nothing), in bits/s.
"""

from __future__ import annotations

import math

import numpy as np


def _entries(inside: np.ndarray) -> np.ndarray:
    """Indices where ``inside`` turns True (including index 0 when it starts True)."""
    prev = np.concatenate([[False], inside[:-1]])
    return np.flatnonzero(inside & ~prev)


def trial_metrics(
    *,
    times: np.ndarray,
    path: np.ndarray,
    target: np.ndarray,
    radius: float,
    start_t: float,
    end_t: float,
    success: bool,
) -> dict:
    """The per-trial metrics of the module docstring for one trial's samples ``times`` (T,),
    cursor ``path`` (T, 2)."""
    times = np.asarray(times, dtype=np.float64)
    path = np.asarray(path, dtype=np.float64).reshape(-1, 2)
    target = np.asarray(target, dtype=np.float64)
    dist0 = float(np.linalg.norm(target - path[0])) if len(path) else float("nan")
    width = 2.0 * float(radius)
    inside = np.linalg.norm(path - target, axis=1) <= radius if len(path) else np.zeros(0, bool)
    entries = _entries(inside)
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1) if len(path) > 1 else np.zeros(0)
    out = {
        "success": bool(success),
        "duration_s": float(end_t - start_t),
        "distance": dist0,
        "fitts_id_bits": math.log2((dist0 + width) / width) if width > 0 else float("nan"),
        "time_to_target_s": None,
        "dial_in_s": None,
        "path_efficiency": None,
        "n_entries": int(entries.size),
    }
    if entries.size:
        first = int(entries[0])
        travelled = float(steps[:first].sum())
        straight = max(dist0 - radius, 0.0)
        out["path_efficiency"] = 1.0 if travelled <= 0 else min(1.0, straight / travelled)
    if success and entries.size:
        last = int(entries[-1])
        out["time_to_target_s"] = float(times[last] - start_t)
        out["dial_in_s"] = float(times[last] - times[int(entries[0])])
    return out


def _median(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.median(v)) if v else None


def summarise(trials: list[dict]) -> dict:
    """Run-level metrics from :func:`trial_metrics` dicts (module docstring)."""
    n = len(trials)
    ok = [t for t in trials if t["success"]]
    total = float(sum(t["duration_s"] for t in trials))
    bits = float(sum(t["fitts_id_bits"] for t in ok))
    return {
        "n_trials": n,
        "n_success": len(ok),
        "success_rate": (len(ok) / n) if n else None,
        "median_time_to_target_s": _median([t["time_to_target_s"] for t in ok]),
        "median_dial_in_s": _median([t["dial_in_s"] for t in ok]),
        "median_path_efficiency": _median([t["path_efficiency"] for t in trials]),
        "bitrate_bps": (bits / total) if total > 0 else None,
        "task_time_s": total,
    }
