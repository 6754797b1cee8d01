"""Sessions from files, by suffix: the NPZ interchange format, MAT files and NWB files.

Every loader returns a :class:`~rpnt_core.data.session.Session` that has passed
:func:`~rpnt_core.data.validate.validate_session`, so downstream code can trust shapes, dtypes and
finiteness; every validation failure raises :class:`ValueError` whose message starts with the
offending field.  The formats themselves: :mod:`rpnt_core.data.npz` (the interchange format),
:mod:`rpnt_core.data.mat` with :mod:`rpnt_core.data.mat_layouts`, :mod:`rpnt_core.data.nwb`.

``describe_bytes``, ``NWB_COUNTS`` and ``NWB_BEHAVIOUR`` are also importable from here, where the
service and the streaming NWB writer import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rpnt_core.data.limits import describe_bytes
from rpnt_core.data.mat import load_mat
from rpnt_core.data.npz import load_npz
from rpnt_core.data.nwb import NWB_BEHAVIOUR, NWB_COUNTS, load_nwb
from rpnt_core.data.session import Session

__all__ = ["NWB_BEHAVIOUR", "NWB_COUNTS", "describe_bytes", "load_session", "session_files"]

_LOADERS = {".npz": load_npz, ".mat": load_mat, ".nwb": load_nwb}


def load_session(path: str | Path, **kw: Any) -> Session:
    """Load a session by file suffix (case-insensitive).

    Args:
        path: a ``.npz`` (:func:`~rpnt_core.data.npz.load_npz`), ``.mat``
            (:func:`~rpnt_core.data.mat.load_mat`) or ``.nwb`` (:func:`~rpnt_core.data.nwb.load_nwb`)
            file.
        **kw: passed through to the loader, e.g. ``bin_s=`` for NWB.
    Returns:
        The validated :class:`Session`.
    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: an unknown suffix, or the loader's own errors.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _LOADERS:
        raise ValueError(
            f"path: unknown suffix {path.suffix!r} for {path.name}; expected one of {sorted(_LOADERS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    return _LOADERS[suffix](path, **kw)


def session_files(folder: str | Path) -> list[Path]:
    """The recordings in a folder that :func:`load_session` reads (not its sub-folders).

    Args:
        folder: the directory to list.
    Returns:
        Its ``*.npz``, then ``*.mat``, then ``*.nwb`` files, each group sorted by name (suffixes
        matched as written); empty when there are none.
    """
    folder = Path(folder)
    return [f for suffix in _LOADERS for f in sorted(folder.glob(f"*{suffix}"))]
