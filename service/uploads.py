"""Calibration data in: an uploaded file or the daemon's own recent history → one validated NPZ.

Uploaded bytes are identified by their magic number, not their name: NWB (HDF5:
``\\x89HDF\\r\\n\\x1a\\n``), else NPZ (the NPZ loader says so when it is not a zip).  They are
parsed by the core loaders (:func:`rpnt_core.data.load_npz`, :func:`rpnt_core.data.load_nwb`) with
a limit on what they may inflate — in a child process (:mod:`service.upload_parse`), never in the
daemon's — and nothing is ever unpickled.  Then the session must fit the live model: single-site
counts with the model's channel count, the live model's target series (velocity, position, …)
at its width, varying in every dimension, the daemon's bin width, and at least ``min_bins`` bins.  Every failure is a
:class:`CalibrationInputError` whose one-line message names the field and what is wrong (HTTP
422), and never a server path or a parser's internals.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from rpnt_core.data.session import METADATA_FIELDS

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# A loader's own message starts with the field it is about (an array, or a dataset's path in an
# HDF5 file); a parser library's may instead name server paths or carry Python reprs.
_FIELD_MESSAGE = re.compile(r"[A-Za-z_][\w/]*: [^\n]+")


class CalibrationInputError(ValueError):
    """Calibration data that cannot be used; the message is for the person who sent it."""


def sniff_suffix(head: bytes) -> str:
    """``.nwb`` for HDF5's first bytes, else ``.npz`` (whose loader refuses a non-zip with its own
    message); :class:`CalibrationInputError` for an empty file."""
    if not head:
        raise CalibrationInputError("file: the upload is empty")
    return ".nwb" if head.startswith(HDF5_MAGIC) else ".npz"


def check_session(
    session,
    *,
    target: str,
    n_channels: int,
    n_outputs: int,
    bin_s: float,
    min_bins: int,
    holdout_fraction: float,
):
    """``session`` decoding ``target`` (the live model's), or :class:`CalibrationInputError` unless
    it can calibrate the live model."""
    if session.counts.ndim != 2:
        raise CalibrationInputError(
            f"counts: expected single-site (T, N) counts, got shape {session.counts.shape}"
        )
    if session.n_channels != n_channels:
        raise CalibrationInputError(
            f"counts: {session.n_channels} channels, the live model takes {n_channels}"
        )
    if target not in session.targets:
        raise CalibrationInputError(
            f"{target}: calibration needs the live model's target series (`{target}`; "
            "the NPZ key `velocity`, `position` or `behaviour_<name>`)"
        )
    session = session.with_target(target)
    labels = session.labels
    if labels.shape[1] != n_outputs:
        raise CalibrationInputError(
            f"{target}: {labels.shape[1]} dimensions, the live model decodes {n_outputs}"
        )
    if abs(float(session.bin_s) - bin_s) > 1e-9:
        raise CalibrationInputError(
            f"bin_s: the data is binned at {session.bin_s * 1e3:g} ms, the daemon decodes "
            f"{bin_s * 1e3:g} ms bins"
        )
    if session.n_bins < min_bins:
        raise CalibrationInputError(
            f"counts: {session.n_bins} bins ({session.n_bins * bin_s:.1f} s) is too short; "
            f"calibration needs at least {min_bins} bins ({min_bins * bin_s:.1f} s)"
        )
    hold = labels[session.n_bins - int(session.n_bins * holdout_fraction) :]
    for name, part in (("the session", labels), ("the holdout part (the end)", hold)):
        flat = np.flatnonzero(np.std(part, axis=0) == 0)
        if flat.size:
            raise CalibrationInputError(
                f"{target}: dimension(s) {flat.tolist()} are constant over {name}; R² is undefined"
            )
    return session


def load_upload(path: Path, *, bin_s: float, max_bytes: int):
    """Parse an uploaded file (NPZ or NWB, by magic number) into a :class:`~rpnt_core.data.Session`,
    inflating at most ``max_bytes`` (an NWB file's spike times are binned at ``bin_s``, the
    daemon's bin width).  Meant for the parse child (:mod:`service.upload_parse`); ``path`` is
    renamed to its format's suffix and removed."""
    from rpnt_core.data import load_session

    with open(path, "rb") as f:
        suffix = sniff_suffix(f.read(len(HDF5_MAGIC)))
    target = path.with_suffix(suffix)
    path.rename(target)
    try:
        return load_session(target, max_bytes=max_bytes, **({"bin_s": bin_s} if suffix == ".nwb" else {}))
    except ImportError:
        raise CalibrationInputError("file: NWB uploads need the [nwb] extra on the server") from None
    except ValueError as exc:
        raise CalibrationInputError(_field_message(exc, suffix, target.parent)) from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a corrupt file may break a parser in any way
        raise CalibrationInputError(_unreadable(suffix)) from None
    finally:
        target.unlink(missing_ok=True)


def _field_message(exc: ValueError, suffix: str, where: Path) -> str:
    """The loader's one-line ``field: what is wrong``; anything else (a parser library's words,
    which may hold server paths or reprs) becomes :func:`_unreadable`."""
    text = str(exc)
    if _FIELD_MESSAGE.fullmatch(text) and str(where) not in text:
        return text
    return _unreadable(suffix)


def _unreadable(suffix: str) -> str:
    return f"file: could not be read as {suffix[1:].upper()} (a damaged file, or not {suffix[1:].upper()})"


def intention_labels(session):
    """``session`` with ReFIT intention labels made from its task streams
    (:func:`streaming.closedloop.refit.intention_session`) as its velocity;
    :class:`CalibrationInputError` naming the stream when they cannot be used (missing, NaN,
    shorter or longer than the counts, a target without a cursor)."""
    from streaming.closedloop.refit import TaskStreamError, intention_session

    try:
        return intention_session(session)
    except TaskStreamError as exc:
        raise CalibrationInputError(str(exc)) from None


def recent_session(counts: np.ndarray, kinematics: np.ndarray, *, bin_s: float, target: str):
    """The closed-loop case: the daemon's recent decoded bins with the rig's kinematics, which are
    the live model's ``target`` series."""
    from rpnt_core.data import Session

    if counts.shape[0] == 0:
        raise CalibrationInputError(
            "source=recent: the daemon holds no decoded bins with kinematics — the rig must "
            "stream KINEMATICS messages (docs/protocol.md) while the daemon decodes"
        )
    series = (
        {target: kinematics} if target in ("velocity", "position") else {"behaviour": {target: kinematics}}
    )
    return Session(counts=counts, bin_s=bin_s, target=target, source="daemon history", **series)


def with_live_metadata(session, live: dict):
    """Calibration data that names no subject/session/task/date inherits the live decoder's, so the
    live model is scored, and the candidate trained and exported, under the metadata the daemon
    decodes with (an upload that names its own keeps them)."""
    from dataclasses import replace

    missing = {k: live[k] for k in METADATA_FIELDS if k in live and not getattr(session, k)}
    return replace(session, **missing) if missing else session


def save_canonical(session, path: Path) -> Path:
    """The session as plain NPZ (counts, velocity, bin_s and metadata): what the worker reads."""
    from rpnt_core.data import save_npz

    return save_npz(session, path)
