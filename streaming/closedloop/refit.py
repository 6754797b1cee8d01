"""ReFIT intention labels: what the participant meant, from the task streams alone.

The ReFIT rule (Gilja et al. 2012): at each bin the decoded velocity is rotated toward the target
(its speed kept: the user wanted to go to the target, at the speed the decoder showed), and set
to zero while the cursor is on the target (holding: the user wanted to stay).  No hand kinematics
are needed, so a paralysed participant's decoder can be recalibrated from closed-loop use.

:func:`refit_labels` is the rule as a pure function; :func:`check_task_streams` refuses streams
it cannot use with a :class:`TaskStreamError` naming the field (HTTP 422 in ``POST /calibrate``).

Kept speed is the rule's weak point when it is repeated: a least-squares refit predicts less than
its labels' spread, so labels carrying the decoded speed slow each new decoder further, and a
decoder that drift has slowed passes its slowness on.  :func:`on_head_scale` (what the calibration
worker applies to intention labels) takes the labels' directions and relative speeds from the rule
and their overall speed from the live decoder's head — the spread of the target it was first
fitted to, which a kept head carries through every recalibration.
"""

from __future__ import annotations

import numpy as np

#: the NPZ keys (``extra_`` + name) of the task streams an upload carries for ``labels=refit``
TASK_FIELDS = ("task_decoded", "task_cursor", "task_target", "task_radius")


class TaskStreamError(ValueError):
    """Task streams that cannot become labels; the message starts with the field."""


def _series(name: str, value, n_bins: int) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind not in "iuf":
        raise TaskStreamError(f"{name}: must be numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise TaskStreamError(f"{name}: expected shape (T, 2), got {a.shape}")
    if a.shape[0] < n_bins:
        raise TaskStreamError(f"{name}: {a.shape[0]} bins, shorter than the {n_bins} bins of counts")
    if a.shape[0] > n_bins:
        raise TaskStreamError(f"{name}: {a.shape[0]} bins, longer than the {n_bins} bins of counts")
    if not np.all(np.isfinite(a)):
        raise TaskStreamError(f"{name}: contains NaN or inf")
    return a


def check_task_streams(
    streams: dict, *, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(decoded, cursor, target, radius (T,)) validated against ``n_bins`` bins of counts; keys as
    :data:`TASK_FIELDS`.  A target stream without a cursor stream, or any stream shorter or longer
    than the counts, non-finite or mis-shaped, raises :class:`TaskStreamError`."""
    if "task_target" not in streams:
        raise TaskStreamError("task_target: missing; labels=refit needs the target positions per bin")
    if "task_cursor" not in streams:
        raise TaskStreamError(
            "task_cursor: missing; the targets need the cursor positions per bin to rotate toward"
        )
    if "task_decoded" not in streams:
        raise TaskStreamError("task_decoded: missing; labels=refit needs the decoded velocity per bin")
    decoded = _series("task_decoded", streams["task_decoded"], n_bins)
    cursor = _series("task_cursor", streams["task_cursor"], n_bins)
    target = _series("task_target", streams["task_target"], n_bins)
    if "task_radius" not in streams:
        raise TaskStreamError(
            "task_radius: missing; the target radius (a number, or one per bin) tells holding apart"
        )
    r = np.asarray(streams["task_radius"])
    if r.dtype.kind not in "iuf" or r.ndim > 1 or (r.ndim == 1 and r.shape[0] != n_bins):
        raise TaskStreamError(f"task_radius: expected a number or ({n_bins},) numbers, got shape {r.shape}")
    r = np.broadcast_to(r.astype(np.float64), (n_bins,))
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise TaskStreamError("task_radius: must be finite and ≥ 0")
    return decoded, cursor, target, r


def refit_labels(
    *, decoded: np.ndarray, cursor: np.ndarray, target: np.ndarray, radius: np.ndarray | float
) -> np.ndarray:
    """(T, 2) float32 labels: ``|decoded_t| · (target_t − cursor_t) / |target_t − cursor_t|``, and 0
    where ``|target_t − cursor_t| ≤ radius_t`` (holding).  Inputs (T, 2) (radius scalar or (T,))."""
    d = np.asarray(decoded, dtype=np.float64)
    off = np.asarray(target, dtype=np.float64) - np.asarray(cursor, dtype=np.float64)
    dist = np.linalg.norm(off, axis=1)
    speed = np.linalg.norm(d, axis=1)
    hold = dist <= np.broadcast_to(np.asarray(radius, dtype=np.float64), dist.shape)
    unit = off / np.where(dist > 0, dist, 1.0)[:, None]
    out = speed[:, None] * unit
    out[hold] = 0.0
    return out.astype(np.float32)


def on_head_scale(
    labels: np.ndarray, *, mean: np.ndarray, scale: np.ndarray, fit_bins: int | None = None
) -> tuple[np.ndarray, float]:
    """Intention velocity labels (T, D) times one factor, so that their RMS speed equals that of the
    target a decoder's head was fitted to — ``sqrt(Σ_d mean_d² + scale_d²)`` for the head's target
    ``mean`` and ``scale`` (D,) (the per-dimension mean and standard deviation it de-normalises by) —
    → (labels (T, D) float32, the factor).  Directions, relative speeds and holds (zeros) are kept.
    The factor is measured on the first ``fit_bins`` bins (all: None; holdout bins after them are
    rescaled but not read); labels that are all zero are returned as they are, with factor 1."""
    lab = np.asarray(labels, dtype=np.float64)
    rms = float(np.sqrt((lab[:fit_bins] ** 2).sum(axis=1).mean()))
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)
    target = float(np.sqrt((m**2 + s**2).sum()))
    if not (rms > 0 and np.isfinite(rms) and target > 0):
        return lab.astype(np.float32), 1.0
    c = target / rms
    return (lab * c).astype(np.float32), c


def intention_session(session):
    """``session`` (its ``extra`` holding the task streams of :data:`TASK_FIELDS`) with ReFIT labels
    as its ``velocity``: what ``POST /calibrate`` with ``labels=refit`` trains on."""
    from dataclasses import replace

    decoded, cursor, target, radius = check_task_streams(session.extra, n_bins=session.n_bins)
    labels = refit_labels(decoded=decoded, cursor=cursor, target=target, radius=radius)
    extra = {k: v for k, v in session.extra.items() if k not in TASK_FIELDS}
    return replace(session, velocity=labels, target="velocity", extra=extra)
