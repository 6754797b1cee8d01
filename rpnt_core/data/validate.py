"""Validation of a :class:`~rpnt_core.data.session.Session`: the one gate every loader passes through.

Every failure raises :class:`ValueError` whose message starts with the offending field.  The
array checks (:func:`numeric_array`, :func:`check_finite`, :func:`validate_bin_s`) are shared with
the loaders so that a value read from a file is judged by the same rules as one built in memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from rpnt_core.data.session import Session

__all__ = ["check_finite", "numeric_array", "validate_bin_s", "validate_session"]

_INT32_MAX = np.iinfo(np.int32).max
_METADATA_STRINGS = ("subject", "session", "task", "source")


def numeric_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a real numeric ndarray.

    Args:
        name: the field, for the error message.
        value: anything :func:`numpy.asarray` accepts.
    Returns:
        The array, dtype unchanged (integer or floating).
    Raises:
        ValueError: for bool, object, string or complex arrays.
    """
    arr = np.asarray(value)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name}: must be a real numeric array, got dtype {arr.dtype}")
    return arr


def check_finite(name: str, arr: np.ndarray) -> None:
    """Raise ``ValueError`` naming ``name`` when a floating ``arr`` holds NaN or inf."""
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise ValueError(f"{name}: contains NaN")
        if np.isinf(arr).any():
            raise ValueError(f"{name}: contains inf")


def validate_bin_s(value: Any) -> float:
    """A bin width in seconds.

    Args:
        value: a numeric scalar (or one-element array).
    Returns:
        The width as ``float``.
    Raises:
        ValueError: ``bin_s: …`` unless it is one finite number > 0.
    """
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"bin_s: must be a scalar, got shape {arr.shape}")
    arr = numeric_array("bin_s", arr)
    b = float(arr.reshape(()))
    if not np.isfinite(b):
        raise ValueError(f"bin_s: must be finite, got {b}")
    if b <= 0:
        raise ValueError(f"bin_s: must be > 0, got {b}")
    return b


def validate_session(session: Session) -> Session:
    """Check a session and return it with normalised dtypes.

    A target the session lacks is not an error here (unlabelled data is valid);
    :meth:`Session.with_target` refuses it.

    Args:
        session: the session to check.
    Returns:
        A new ``Session`` (arrays not copied when already the right dtype) with counts ``int32``,
        velocity/position/behaviour/site_xy ``float32``, timestamps ``float64``, ``date_days`` a
        ``float``.
    Raises:
        ValueError: message prefixed with the field name, for wrong ndim/shapes, NaN/inf in any
            numeric array, negative or fractional counts, length mismatches between
            counts/velocity/position/behaviour series/timestamps, non-positive or non-finite
            ``bin_s``, missing or misshapen ``site_xy`` for 3-D counts, non-increasing timestamps,
            non-string metadata, a ``target`` that is not a non-empty string.
    """
    if not isinstance(session, Session):
        raise ValueError(f"session: expected a Session, got {type(session).__name__}")
    counts = _validate_counts(session.counts)
    n_bins = counts.shape[-2]
    bin_s = validate_bin_s(session.bin_s)
    velocity = _optional_series("velocity", session.velocity, n_bins)
    position = _optional_series("position", session.position, n_bins)
    behaviour = _validate_behaviour(session.behaviour, n_bins)
    if not isinstance(session.target, str) or not session.target:
        raise ValueError(f"target: must be a non-empty str, got {session.target!r}")
    timestamps = _validate_timestamps(session.timestamps, n_bins)
    site_xy = _validate_site_xy(session.site_xy, counts)
    date_days = _validate_metadata(session)
    return replace(
        session,
        counts=counts,
        bin_s=bin_s,
        velocity=velocity,
        position=position,
        behaviour=behaviour,
        timestamps=timestamps,
        site_xy=site_xy,
        date_days=date_days,
    )


def _validate_counts(counts: Any) -> np.ndarray:
    """Shape: (T, N) or (S, T, N) non-negative whole counts → the same shape, ``int32``."""
    arr = numeric_array("counts", counts)
    if arr.ndim not in (2, 3):
        raise ValueError(f"counts: expected 2-D (T, N) or 3-D (S, T, N), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"counts: every axis must be non-empty, got shape {arr.shape}")
    check_finite("counts", arr)
    if (arr < 0).any():
        raise ValueError("counts: contains negative values")
    if np.issubdtype(arr.dtype, np.floating) and (arr != np.round(arr)).any():
        raise ValueError("counts: contains non-integer values (fractional part)")
    if arr.max() > _INT32_MAX:
        raise ValueError(f"counts: values exceed the int32 range (max {arr.max()})")
    return arr.astype(np.int32, copy=False)  # (T, N) or (S, T, N)


def _validate_series(name: str, value: Any, n_bins: int, dtype: type) -> np.ndarray:
    """Shape: (T, D) with T = ``n_bins`` and D ≥ 1, finite → the same shape in ``dtype``."""
    arr = numeric_array(name, value)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected 2-D (T, D), got shape {arr.shape}")
    if arr.shape[0] != n_bins:
        raise ValueError(f"{name}: length {arr.shape[0]} does not match counts length {n_bins}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: must have at least one column, got shape {arr.shape}")
    check_finite(name, arr)
    return arr.astype(dtype, copy=False)


def _optional_series(name: str, value: Any, n_bins: int) -> np.ndarray | None:
    return None if value is None else _validate_series(name, value, n_bins, np.float32)


def _validate_behaviour(behaviour: Any, n_bins: int) -> dict[str, np.ndarray]:
    """Named behaviour series beyond velocity/position: identifier names, each (T, D) float32."""
    if not isinstance(behaviour, dict):
        raise ValueError(f"behaviour: must be a dict of named (T, D) arrays, got {type(behaviour).__name__}")
    out: dict[str, np.ndarray] = {}
    for name, value in behaviour.items():
        if not isinstance(name, str) or not name.isidentifier() or name in ("velocity", "position"):
            raise ValueError(
                f"behaviour: names must be identifiers other than velocity/position, got {name!r}"
            )
        out[name] = _validate_series(name, value, n_bins, np.float32)
    return out


def _validate_timestamps(value: Any, n_bins: int) -> np.ndarray | None:
    """Shape: (T,) strictly increasing bin start times → float64 (``None`` stays ``None``)."""
    if value is None:
        return None
    ts = numeric_array("timestamps", value)
    if ts.ndim != 1:
        raise ValueError(f"timestamps: expected 1-D (T,), got shape {ts.shape}")
    if ts.shape[0] != n_bins:
        raise ValueError(f"timestamps: length {ts.shape[0]} does not match counts length {n_bins}")
    check_finite("timestamps", ts)
    timestamps = ts.astype(np.float64, copy=False)  # (T,)
    if n_bins > 1 and not (np.diff(timestamps) > 0).all():
        raise ValueError("timestamps: must be strictly increasing")
    return timestamps


def _validate_site_xy(value: Any, counts: np.ndarray) -> np.ndarray | None:
    """Shape: (S, 2) site coordinates → float32; required for 3-D counts (S = 1 for 2-D)."""
    n_sites = counts.shape[0] if counts.ndim == 3 else 1
    if value is None:
        if counts.ndim == 3:
            raise ValueError(f"site_xy: required for 3-D (multi-site) counts, expected shape ({n_sites}, 2)")
        return None
    xy = numeric_array("site_xy", value)
    if xy.shape != (n_sites, 2):
        raise ValueError(f"site_xy: expected shape ({n_sites}, 2), got {xy.shape}")
    check_finite("site_xy", xy)
    return xy.astype(np.float32, copy=False)  # (S, 2)


def _validate_metadata(session: Session) -> float:
    """Check the string fields, ``date_days`` and ``extra``; returns ``date_days`` as a float."""
    for name in _METADATA_STRINGS:
        if not isinstance(getattr(session, name), str):
            raise ValueError(f"{name}: must be a str, got {type(getattr(session, name)).__name__}")
    try:
        if isinstance(session.date_days, (str, bytes)):
            raise TypeError
        date_days = float(session.date_days)
    except (TypeError, ValueError):
        raise ValueError(f"date_days: must be a number, got {session.date_days!r}") from None
    if not np.isfinite(date_days):
        raise ValueError(f"date_days: must be finite, got {date_days}")
    if not isinstance(session.extra, dict):
        raise ValueError(f"extra: must be a dict, got {type(session.extra).__name__}")
    return date_days
