"""Loading and saving sessions: the NPZ interchange format, MAT files and NWB files.

Every loader returns a :class:`~rpnt_core.data.session.Session` that has passed
:func:`validate_session`, so downstream code can trust shapes, dtypes and finiteness.

NPZ interchange format
----------------------
One ``.npz`` file (written with :func:`numpy.savez_compressed`; read by :func:`load_npz` member
by member, never unpickling, optionally within a limit on what it may inflate) holds one session:

==============  ==========================  =========  ==================================================
key             shape                       dtype      meaning
==============  ==========================  =========  ==================================================
``counts``      (T, N) or (S, T, N)         integer    spike counts per bin (S sites for multi-site data)
``bin_s``       () scalar                   float      bin width in seconds, > 0
``velocity``    (T, D)                      float      behaviour target (omit only for unlabelled data)
``position``    (T, D)                      float      optional
``timestamps``  (T,)                        float64    optional; bin *start* times, strictly increasing
``site_xy``     (S, 2)                      float      site coordinates; required when counts is 3-D
``subject``     () unicode                  str        optional 0-d unicode array
``session``     () unicode                  str        optional 0-d unicode array
``task``        () unicode                  str        optional 0-d unicode array
``date_days``   () scalar                   float      optional recording date in days (any origin)
``target``      () unicode                  str        optional: which series is decoded (default velocity)
``behaviour_<k>`` (T, D_k)                  float      optional further behaviour series, e.g.
                                                       ``behaviour_force`` → ``Session.behaviour["force"]``
``extra_<k>``   any                         non-obj.   optional numeric/string arrays, loaded into
                                                       ``Session.extra[k]`` (e.g. simulator ground truth)
==============  ==========================  =========  ==================================================

Any other key is rejected (a typo such as ``velocities`` would otherwise be silently dropped).
After loading, ``counts`` is ``int32``, ``velocity``/``position``/``site_xy`` are ``float32`` and
``timestamps`` is ``float64``.

MAT files
---------
:func:`load_mat` is driven by :data:`MAT_LAYOUTS`, a table of :class:`MatLayout` records that say
which keys hold what (top-level variables or the fields of one struct), whether arrays are stored
channels-first, which rows/columns to take, whether counts are stored as rates in Hz, where the
bin width comes from (a variable, a constant, or the checked-uniform step of the time stamps),
which further behaviour series exist (force, EMG: :class:`MatSeries`) and where the session name,
recording date, channel names and trial table are.  The layout is detected from the variable
names in the file when not given; a file no layout matches is refused with one line saying what it
holds.  Supporting a new MAT file means adding a record, not a function.

NWB files
---------
:func:`load_nwb` bins ``Units`` spike times and resamples a behaviour time series onto the bins.
A file that already holds binned counts -- a TimeSeries ``binned_counts`` in
``processing/ecephys`` with a sampling rate (what ``rpnt replay --nwb`` and ``rpnt serve``'s
session recording write, :data:`NWB_COUNTS`) -- is read as it is instead: the counts exactly, the
bin width from the rate, and the behaviour series on the same time base exactly
(docs/nwb.md).  It needs the optional extra ``pip install 'rpnt[nwb]'``.

Every validation failure raises :class:`ValueError` whose message starts with the offending field.
"""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from rpnt_core.data.session import Session

__all__ = [
    "MAT_LAYOUTS",
    "MatLayout",
    "MatSeries",
    "NWB_BEHAVIOUR",
    "NWB_COUNTS",
    "load_mat",
    "load_npz",
    "load_nwb",
    "load_session",
    "save_npz",
    "validate_session",
]

_INT32_MAX = np.iinfo(np.int32).max

#: where an NWB file keeps binned spike counts: (processing module, TimeSeries name); the series is
#: (T, N) integer counts with ``rate`` = 1 / bin width.  Behaviour series per bin live in
#: processing/behavior (:data:`NWB_BEHAVIOUR`), each named as the session names it (velocity, …).
NWB_COUNTS = ("ecephys", "binned_counts")
NWB_BEHAVIOUR = "behavior"

# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _numeric(name: str, value: Any) -> np.ndarray:
    """``value`` as a real numeric ndarray (bool and object/string arrays are rejected)."""
    arr = np.asarray(value)
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name}: must be a real numeric array, got dtype {arr.dtype}")
    return arr


def _check_finite(name: str, arr: np.ndarray) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any():
            raise ValueError(f"{name}: contains NaN")
        if np.isinf(arr).any():
            raise ValueError(f"{name}: contains inf")


def _validate_counts(counts: Any) -> np.ndarray:
    arr = _numeric("counts", counts)
    if arr.ndim not in (2, 3):
        raise ValueError(f"counts: expected 2-D (T, N) or 3-D (S, T, N), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"counts: every axis must be non-empty, got shape {arr.shape}")
    _check_finite("counts", arr)
    if (arr < 0).any():
        raise ValueError("counts: contains negative values")
    if np.issubdtype(arr.dtype, np.floating) and (arr != np.round(arr)).any():
        raise ValueError("counts: contains non-integer values (fractional part)")
    if arr.max() > _INT32_MAX:
        raise ValueError(f"counts: values exceed the int32 range (max {arr.max()})")
    return arr.astype(np.int32, copy=False)  # (T, N) or (S, T, N)


def _validate_series(name: str, value: Any, n_bins: int, dtype: type) -> np.ndarray:
    arr = _numeric(name, value)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected 2-D (T, D), got shape {arr.shape}")
    if arr.shape[0] != n_bins:
        raise ValueError(f"{name}: length {arr.shape[0]} does not match counts length {n_bins}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: must have at least one column, got shape {arr.shape}")
    _check_finite(name, arr)
    return arr.astype(dtype, copy=False)


def _validate_bin_s(value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"bin_s: must be a scalar, got shape {arr.shape}")
    arr = _numeric("bin_s", arr)
    b = float(arr.reshape(()))
    if not np.isfinite(b):
        raise ValueError(f"bin_s: must be finite, got {b}")
    if b <= 0:
        raise ValueError(f"bin_s: must be > 0, got {b}")
    return b


def validate_session(session: Session) -> Session:
    """Check a session and return it with normalised dtypes.

    Contract: raises ``ValueError`` (message prefixed with the field name) on wrong ndim/shapes,
    NaN/inf in any numeric array, negative or fractional counts, length mismatches between
    counts/velocity/position/behaviour series/timestamps, non-positive or non-finite ``bin_s``,
    missing or misshapen ``site_xy`` for 3-D counts, non-increasing timestamps, non-string
    metadata, a ``target`` that is not a non-empty string.  (A target the session lacks is not an
    error here — unlabelled data is valid; :meth:`Session.with_target` refuses it.)
    On success returns a new ``Session`` (arrays not copied when already the right dtype) with
    counts ``int32``, velocity/position/behaviour/site_xy ``float32``, timestamps ``float64``.
    """
    if not isinstance(session, Session):
        raise ValueError(f"session: expected a Session, got {type(session).__name__}")
    counts = _validate_counts(session.counts)
    n_bins = counts.shape[-2]
    bin_s = _validate_bin_s(session.bin_s)

    velocity = position = timestamps = site_xy = None
    if session.velocity is not None:
        velocity = _validate_series("velocity", session.velocity, n_bins, np.float32)
    if session.position is not None:
        position = _validate_series("position", session.position, n_bins, np.float32)
    behaviour = _validate_behaviour(session.behaviour, n_bins)
    if not isinstance(session.target, str) or not session.target:
        raise ValueError(f"target: must be a non-empty str, got {session.target!r}")
    if session.timestamps is not None:
        ts = _numeric("timestamps", session.timestamps)
        if ts.ndim != 1:
            raise ValueError(f"timestamps: expected 1-D (T,), got shape {ts.shape}")
        if ts.shape[0] != n_bins:
            raise ValueError(f"timestamps: length {ts.shape[0]} does not match counts length {n_bins}")
        _check_finite("timestamps", ts)
        timestamps = ts.astype(np.float64, copy=False)  # (T,)
        if n_bins > 1 and not (np.diff(timestamps) > 0).all():
            raise ValueError("timestamps: must be strictly increasing")

    n_sites = counts.shape[0] if counts.ndim == 3 else 1
    if session.site_xy is None:
        if counts.ndim == 3:
            raise ValueError(f"site_xy: required for 3-D (multi-site) counts, expected shape ({n_sites}, 2)")
    else:
        xy = _numeric("site_xy", session.site_xy)
        if xy.shape != (n_sites, 2):
            raise ValueError(f"site_xy: expected shape ({n_sites}, 2), got {xy.shape}")
        _check_finite("site_xy", xy)
        site_xy = xy.astype(np.float32, copy=False)  # (S, 2)

    for name in ("subject", "session", "task", "source"):
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


# --------------------------------------------------------------------------------------------
# NPZ
# --------------------------------------------------------------------------------------------

_NPZ_ARRAYS = ("velocity", "position", "timestamps", "site_xy")  # besides counts
_NPZ_STRINGS = ("subject", "session", "task", "target")
_NPZ_KEYS = frozenset(("counts", "bin_s", "date_days") + _NPZ_ARRAYS + _NPZ_STRINGS)
_EXTRA_PREFIX = "extra_"
_BEHAVIOUR_PREFIX = "behaviour_"  # further named behaviour series, e.g. behaviour_force


def _compact_counts(counts: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype holding the (validated, non-negative) counts, for storage."""
    top = int(counts.max())
    for dt in (np.uint8, np.uint16):
        if top <= np.iinfo(dt).max:
            return counts.astype(dt)
    return counts.astype(np.int32)


def save_npz(session: Session, path: str | Path, *, include_extra: bool = False) -> Path:
    """Validate ``session`` and write it to ``path`` in the NPZ interchange format.

    Counts are stored in the smallest unsigned integer dtype that holds them.  With
    ``include_extra`` every ``Session.extra`` entry is stored as ``extra_<key>``; entries must
    be numeric/bool/string arrays or scalars (``ValueError`` otherwise).  Returns the path.
    """
    s = validate_session(session)
    path = Path(path)
    out: dict[str, np.ndarray] = {
        "counts": _compact_counts(s.counts),
        "bin_s": np.asarray(s.bin_s, dtype=np.float64),
    }
    for name in _NPZ_ARRAYS:
        value = getattr(s, name)
        if value is not None:
            out[name] = value
    for name in _NPZ_STRINGS:
        out[name] = np.asarray(getattr(s, name), dtype=np.str_)  # 0-d unicode
    out["date_days"] = np.asarray(s.date_days, dtype=np.float64)
    for name, series in s.behaviour.items():
        out[_BEHAVIOUR_PREFIX + name] = series
    if include_extra:
        for key, value in s.extra.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError(f"extra[{key!r}]: keys must be identifier strings to be stored")
            arr = np.asarray(value)
            if arr.dtype.kind not in "biufcU":
                raise ValueError(f"extra[{key!r}]: cannot store dtype {arr.dtype} without pickling")
            out[_EXTRA_PREFIX + key] = arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # an open file keeps numpy from appending ".npz"
        np.savez_compressed(fh, **out)
    return path


def _scalar_str(name: str, arr: np.ndarray) -> str:
    if arr.dtype.kind != "U" or arr.ndim != 0:
        raise ValueError(f"{name}: expected a 0-d unicode array, got dtype {arr.dtype} shape {arr.shape}")
    return str(arr)


NPZ_MAGIC = b"PK\x03\x04"  # a zip archive's first bytes
NOT_NPZ = (
    "file: not an NPZ file (a zip archive of .npy arrays) — see the NPZ interchange format in the README"
)
_NPY_SUFFIX = ".npy"
_NPZ_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what numpy.savez / savez_compressed write
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    struct.error,
)


def describe_bytes(n: int) -> str:
    """``n`` bytes for a person: ``"512 MB"``, ``"2.2 GB"`` (binary units: 1 MB = 2**20 bytes)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


def _over_limit(field: str, n: int, max_bytes: int | None, what: str = "declares {} uncompressed") -> None:
    """``ValueError`` naming ``field`` when ``n`` bytes exceed ``max_bytes`` (``None``: no limit);
    ``what`` says what the bytes are, ``{}`` standing for their amount."""
    if max_bytes is not None and n > max_bytes:
        raise ValueError(
            f"{field}: {what.format(describe_bytes(n))}, over the {describe_bytes(max_bytes)} limit"
        )


def _open_npz(path: Path) -> zipfile.ZipFile:
    """The archive at ``path``; ``ValueError`` (:data:`NOT_NPZ`) unless it is a readable zip."""
    with open(path, "rb") as fh:
        if fh.read(len(NPZ_MAGIC)) != NPZ_MAGIC:
            raise ValueError(NOT_NPZ)
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS:
        raise ValueError("file: a damaged or truncated NPZ file (its zip directory cannot be read)") from None


def _npz_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Field name → zip member, refusing what the interchange format never holds: a member that is
    not ``<field>.npy``, an unknown field, one stored twice, encryption, or compression other than
    stored/deflated (what ``numpy.savez``/``savez_compressed`` write; a bzip2 or LZMA member would
    inflate without bound on a single read)."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        key = info.filename.removesuffix(_NPY_SUFFIX)
        if key == info.filename or not key.isidentifier() or len(key) > 64:
            raise ValueError("file: the archive holds a member that is not a <field>.npy array")
        if key in members:
            raise ValueError(f"{key}: stored twice in the archive")
        members[key] = info
    unknown = sorted(
        k for k in members if k not in _NPZ_KEYS and not k.startswith((_EXTRA_PREFIX, _BEHAVIOUR_PREFIX))
    )
    if unknown:
        raise ValueError(
            f"npz: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(_NPZ_KEYS))}, "
            "behaviour_<name> and extra_<name>"
        )
    for key, info in members.items():
        if info.flag_bits & 0x1:
            raise ValueError(f"{key}: encrypted; NPZ arrays are stored in the clear")
        if info.compress_type not in _NPZ_METHODS:
            raise ValueError(
                f"{key}: compressed with an unsupported method (NPZ arrays are stored or deflated)"
            )
    return members


def _npy_header(
    zf: zipfile.ZipFile, key: str, info: zipfile.ZipInfo
) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of one member, read from its first bytes only."""
    fmt = np.lib.format
    try:
        with zf.open(info) as fh:
            version = fmt.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"{key}: .npy format version {version[0]}.{version[1]} is not supported")
            return tuple(int(d) for d in shape), dtype, fh.tell()
    except ValueError as exc:
        if str(exc).startswith(f"{key}: "):
            raise
        raise ValueError(f"{key}: not a valid .npy array") from None
    except _ZIP_ERRORS:
        raise ValueError(f"{key}: damaged data in the archive") from None


def _npy_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _check_headers(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], max_bytes: int | None) -> None:
    """Every member's declarations against ``max_bytes``, before any array is read.

    A member is refused when its zip entry (``ZipInfo.file_size``) or its ``.npy`` header (shape ×
    dtype) declares more than the limit, when all of them together do, when it holds Python objects
    (they need unpickling), or when the two declarations disagree (the entry is too short for the
    array it says it holds)."""
    for key, info in members.items():
        _over_limit(key, info.file_size, max_bytes)
    _over_limit(
        "file", sum(i.file_size for i in members.values()), max_bytes, "its arrays declare {} uncompressed"
    )
    sizes: dict[str, int] = {}
    for key, info in members.items():
        shape, dtype, header = _npy_header(zf, key, info)
        if dtype.hasobject:
            raise ValueError(f"{key}: object arrays are not accepted (reading them would mean unpickling)")
        sizes[key] = _npy_bytes(shape, dtype)
        _over_limit(key, sizes[key], max_bytes)
        if header + sizes[key] > info.file_size:
            raise ValueError(f"{key}: damaged: the archive holds fewer bytes than its .npy header declares")
    _over_limit("file", sum(sizes.values()), max_bytes, "its arrays declare {} uncompressed")


def _read_member(zf: zipfile.ZipFile, key: str, info: zipfile.ZipInfo) -> np.ndarray:
    """One array, inflating no more than its (already checked) header declares."""
    try:
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except _ZIP_ERRORS:
        raise ValueError(f"{key}: damaged data in the archive") from None


def _read_npz(path: Path, *, max_bytes: int | None) -> dict[str, np.ndarray]:
    """The arrays of an interchange-format NPZ file by field, read without ``numpy.load``."""
    with _open_npz(path) as zf:
        members = _npz_members(zf)
        _check_headers(zf, members, max_bytes)
        return {key: _read_member(zf, key, info) for key, info in members.items()}


def load_npz(path: str | Path, *, max_bytes: int | None = None) -> Session:
    """Read one session from the NPZ interchange format and validate it; never unpickles.

    This is the one NPZ reader (the CLI and the service's uploads both come here).  Every failure
    is a ``ValueError`` whose message starts with the field (an array's name, or ``file``) and
    never contains the path: :data:`NOT_NPZ` for a file that is not a zip archive; a damaged
    archive or member; a member that is not ``<field>.npy``, an unknown field, one stored twice,
    encrypted or compressed other than stored/deflated; an object array; a missing ``counts`` or
    ``bin_s``; then :func:`validate_session`'s checks.

    ``max_bytes``: every declared size (each zip entry's and each ``.npy`` header's, alone and
    summed) is checked against it before any array is read, and each member then inflates only
    the bytes its header declares (plus the zip reader's 4 KB read-ahead), so no more than
    ``max_bytes`` is ever inflated, whatever the archive claims.  ``None``: no limit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    data = _read_npz(path, max_bytes=max_bytes)
    for required in ("counts", "bin_s"):
        if required not in data:
            raise ValueError(f"{required}: missing from the file")
    meta: dict[str, Any] = {name: _scalar_str(name, data[name]) for name in _NPZ_STRINGS if name in data}
    if "date_days" in data:
        meta["date_days"] = _scalar_float("date_days", data["date_days"])
    extra = {k[len(_EXTRA_PREFIX) :]: v for k, v in data.items() if k.startswith(_EXTRA_PREFIX)}
    behaviour = {k[len(_BEHAVIOUR_PREFIX) :]: v for k, v in data.items() if k.startswith(_BEHAVIOUR_PREFIX)}
    session = Session(
        counts=data["counts"],
        bin_s=data["bin_s"],
        velocity=data.get("velocity"),
        position=data.get("position"),
        behaviour=behaviour,
        timestamps=data.get("timestamps"),
        site_xy=data.get("site_xy"),
        source=str(path),
        extra=extra,
        **meta,
    )
    return validate_session(session)


def _scalar_float(name: str, value: np.ndarray) -> float:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: must be a number, got dtype {arr.dtype} shape {arr.shape}")
    return float(arr.reshape(()))


# --------------------------------------------------------------------------------------------
# MAT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MatSeries:
    """A named behaviour series beyond velocity/position (→ ``Session.behaviour[name]``).

    ``key``: the variable; ``dims``: its columns to keep (``None`` = all).  A variable that is
    absent or empty in a file (e.g. wrist force on a day it was not recorded) leaves the series
    out of that session."""

    name: str
    key: str
    dims: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class MatLayout:
    """Where the session lives inside one kind of MAT file.

    Arrays:

    - ``struct_key``: the variables named below are fields of this struct variable (e.g. the
      Miller lab's ``binnedData``); else they are top-level variables.
    - ``counts_key``/``velocity_key``/``position_key``/``timestamps_key``: variable names
      (``None`` = absent).  Velocity and position may share one variable (different columns).
    - ``behaviour``: further named series (:class:`MatSeries`), e.g. force and EMG.
    - ``channels_first``: 2-D arrays are stored (C, T) and are transposed to (T, C).
    - ``counts_dims``/``velocity_dims``/``position_dims``: which rows (channels-first) or
      columns to keep, after which the array is (T, D).  ``None`` keeps every column.
    - ``counts_in_hz``: the counts variable holds rates in Hz; rate × bin width must be a whole
      spike count in every bin (checked, so smoothed rates are refused rather than rounded).

    Bin width, exactly one of: ``bin_s_key`` (a variable holding seconds), ``bin_s`` (a
    constant), ``bin_s_from_timestamps`` (the step of ``timestamps_key``, checked uniform).

    Metadata (each optional in a file; absent → the default):

    - ``subject``/``task``: constants to attach.
    - ``session_key``: dotted path (``meta.filename``) of the recording's original file name;
      the session name is its stem.  Default: the MAT file's stem.
    - ``datetime_key`` + ``datetime_format``: the recording start (a ``strptime`` format) →
      ``date_days`` (days since 1970-01-01 on the recording's own clock) and
      ``extra["session_start_time"]`` (ISO 8601).
    - ``name_pattern``: a regular expression that must match the whole session name (or else the
      file stem); its named groups ``subject``/``task`` override the constants.
    - ``channel_names_key``/``trials_key``: → ``extra["channel_names"]`` / ``extra["trials"]``.
    """

    name: str
    counts_key: str
    velocity_key: str | None = None
    position_key: str | None = None
    timestamps_key: str | None = None
    behaviour: tuple[MatSeries, ...] = ()
    struct_key: str | None = None
    channels_first: bool = False
    counts_dims: tuple[int, ...] | None = None
    velocity_dims: tuple[int, ...] | None = None
    position_dims: tuple[int, ...] | None = None
    counts_in_hz: bool = False
    bin_s_key: str | None = None
    bin_s: float | None = None
    bin_s_from_timestamps: bool = False
    subject: str = ""
    task: str = ""
    session_key: str | None = None
    datetime_key: str | None = None
    datetime_format: str = ""
    name_pattern: str | None = None
    channel_names_key: str | None = None
    trials_key: str | None = None

    def __post_init__(self) -> None:
        sources = (self.bin_s_key is not None) + (self.bin_s is not None) + bool(self.bin_s_from_timestamps)
        if sources != 1:
            raise ValueError(
                f"bin_s: layout {self.name!r} needs exactly one of bin_s_key, bin_s or bin_s_from_timestamps"
            )
        if self.bin_s_from_timestamps and self.timestamps_key is None:
            raise ValueError(
                f"bin_s: layout {self.name!r} takes the bin width from time stamps but has no timestamps_key"
            )
        if (self.datetime_key is None) != (not self.datetime_format):
            raise ValueError(
                f"datetime_format: layout {self.name!r} needs it exactly when datetime_key is set"
            )

    @property
    def array_keys(self) -> frozenset[str]:
        """Variables every file of this layout holds (fields of ``struct_key`` when set)."""
        keys = (self.counts_key, self.velocity_key, self.position_key, self.timestamps_key, self.bin_s_key)
        return frozenset(k for k in keys if k is not None)

    @property
    def all_keys(self) -> frozenset[str]:
        """Every variable the layout may read (the first part of a dotted path), required or not."""
        optional = [s.key for s in self.behaviour] + [
            self.channel_names_key,
            self.trials_key,
            self.session_key,
            self.datetime_key,
        ]
        return self.array_keys | {k.split(".")[0] for k in optional if k}

    @property
    def required_keys(self) -> frozenset[str]:
        """Top-level variables that identify a file of this layout."""
        return frozenset((self.struct_key,)) if self.struct_key else self.array_keys

    def describe(self) -> str:
        fields = ", ".join(sorted(self.array_keys))
        return (
            f"{self.name} (struct {self.struct_key}: {fields})"
            if self.struct_key
            else f"{self.name} ({fields})"
        )


# The Miller Limb Lab's file names: <monkey>_<MM-DD-YY>[_<task code>]_<NNN>, e.g. Spike_07-18-12_WF_001.
MILLER_SESSION_NAME = r"(?P<subject>[A-Za-z]+)_\d{2}-\d{2}-\d{2}(?:_(?P<task>[A-Za-z]+))?_\d+"

MAT_LAYOUTS: dict[str, MatLayout] = {
    # Stevenson et al. 2011 (CRCNS DREAM), M1 centre-out; see shared/data/stevenson2011_m1_centerout.
    "StevensonV2": MatLayout(
        name="StevensonV2",
        counts_key="spikes",  # (196, T)
        velocity_key="handVel",  # (3, T), rows 0..1 = x, y; row 2 all zeros
        position_key="handPos",  # (3, T)
        timestamps_key="time",  # (1, T) seconds
        channels_first=True,
        velocity_dims=(0, 1),
        position_dims=(0, 1),
        bin_s_key="timeBase",  # (1, 1) = 0.05
        subject="stevenson2011",
        task="center-out",
    ),
    # BME 517 course file, origin undocumented; see shared/data/contdata95_bme517.
    "contdata95": MatLayout(
        name="contdata95",
        counts_key="Y",  # (T, 95)
        velocity_key="X",  # (T, 4): x pos, y pos, x vel, y vel
        position_key="X",
        velocity_dims=(2, 3),
        position_dims=(0, 1),
        bin_s=0.05,
        subject="bme517",
    ),
    # Miller lab area 2 ("S1", Kording lab copy); see shared/data/miller_area2_s1.  No time base:
    # 50 ms bins as the papers state.
    "miller_area2_s1": MatLayout(
        name="miller_area2_s1",
        counts_key="spikes",  # (T, 52) counts
        velocity_key="vel",  # (T, 2)
        position_key="pos",  # (T, 2)
        bin_s=0.05,
        subject="miller_area2",
        task="random-target",
    ),
    # The Miller Limb Lab's binnedData struct (shared/data/limblab_spike_wf_2012, limblab_nick_co).
    "binnedData": MatLayout(
        name="binnedData",
        struct_key="binnedData",
        counts_key="spikeratedata",  # (T, N) Hz per bin
        counts_in_hz=True,
        velocity_key="velocbin",  # (T, 3): x, y velocity and speed
        velocity_dims=(0, 1),
        position_key="cursorposbin",  # (T, 2)
        behaviour=(
            MatSeries(name="force", key="forcedatabin"),  # (T, 2), or empty when not recorded
            MatSeries(name="emg", key="emgdatabin"),
        ),  # (T, muscles), or empty
        timestamps_key="timeframe",  # (T, 1) seconds
        bin_s_from_timestamps=True,
        session_key="meta.filename",  # the original .nev path
        datetime_key="meta.datetime",  # e.g. "7/18/2012 14:0:46.750"
        datetime_format="%m/%d/%Y %H:%M:%S.%f",
        name_pattern=MILLER_SESSION_NAME,
        channel_names_key="spikeguide",  # eeNNuK: electrode NN, unit K
        trials_key="trialtable",
    ),
}


def _describe_layouts() -> str:
    return "; ".join(lay.describe() for lay in MAT_LAYOUTS.values())


def _describe_variable(name: str, shape: tuple[int, ...], cls: str) -> str:
    return f"{name} {'×'.join(map(str, shape))} {cls}"


def _describe_variables(found: dict[str, tuple[tuple[int, ...], str]], most: int = 12) -> str:
    """``"S 5×30 double, V 3×30 double"``: the first ``most`` variables by name, then a count."""
    names = sorted(found)
    shown = ", ".join(_describe_variable(n, *found[n]) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _mat_variables(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, MATLAB class)} of the top-level variables, without reading the data."""
    from scipy.io import whosmat
    from scipy.io.matlab import MatReadError

    try:
        return {name: (tuple(shape), cls) for name, shape, cls in whosmat(path)}
    except NotImplementedError:
        raise ValueError(f"path: {path.name} is a MAT v7.3 (HDF5) file; only MAT v5 is supported") from None
    except (ValueError, OSError, MatReadError) as exc:
        raise ValueError(f"path: {path.name} is not a readable MAT v5 file ({exc})") from None


def _detect_layout(found: dict[str, tuple[tuple[int, ...], str]], path: Path) -> MatLayout:
    keys = set(found)
    fits = [lay for lay in MAT_LAYOUTS.values() if lay.required_keys <= keys]
    if not fits:
        raise ValueError(
            f"layout: no known MAT layout matches {path.name}, which holds {_describe_variables(found) or 'nothing'}; "
            f"known layouts: {_describe_layouts()}"
        )
    fits.sort(key=lambda lay: len(lay.required_keys), reverse=True)
    if len(fits) > 1 and len(fits[0].required_keys) == len(fits[1].required_keys):
        raise ValueError(
            f"layout: {path.name} matches several layouts {[f.name for f in fits]}; pass layout="
        )
    return fits[0]


def _resolve_layout(layout: MatLayout | str | None, found: dict, path: Path) -> MatLayout:
    if isinstance(layout, str):
        if layout not in MAT_LAYOUTS:
            raise ValueError(f"layout: unknown layout {layout!r}; known layouts: {_describe_layouts()}")
        return MAT_LAYOUTS[layout]
    return _detect_layout(found, path) if layout is None else layout


def _unwrap(value: Any) -> Any:
    """A MATLAB scalar struct or cell as the object inside (loadmat wraps them in 1×1 arrays)."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.reshape(-1)[0]
    return value


def _read_root(path: Path, layout: MatLayout, found: dict) -> dict[str, Any]:
    """The layout's variables by name: top-level variables, or the fields of ``struct_key``."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError, mat_struct

    wanted = [layout.struct_key] if layout.struct_key else sorted(layout.all_keys & set(found))
    try:
        m = loadmat(path, variable_names=wanted, struct_as_record=False)
    except (ValueError, OSError, MatReadError) as exc:
        raise ValueError(f"path: {path.name} is not a readable MAT v5 file ({exc})") from None
    if layout.struct_key is None:
        return {k: v for k, v in m.items() if not k.startswith("__")}
    root = _unwrap(m[layout.struct_key])
    if not isinstance(root, mat_struct):
        raise ValueError(
            f"layout: {_describe_variable(layout.struct_key, *found[layout.struct_key])} in "
            f"{path.name} is not the single struct that layout {layout.name!r} reads"
        )
    return {f: getattr(root, f) for f in root._fieldnames}


def _check_keys(root: dict[str, Any], layout: MatLayout, path: Path) -> None:
    missing = sorted(layout.array_keys - set(root))
    if not missing:
        return
    if layout.struct_key:
        raise ValueError(
            f"layout: the struct {layout.struct_key} in {path.name} lacks fields {missing} that layout "
            f"{layout.name!r} needs (it has {sorted(root)})"
        )
    raise ValueError(f"layout: {path.name} lacks variables {missing} required by layout {layout.name!r}")


def _lookup(root: dict[str, Any], dotted: str | None) -> Any:
    """``root["meta"].datetime`` for ``"meta.datetime"``; ``None`` where any part is absent."""
    from scipy.io.matlab import mat_struct

    if dotted is None:
        return None
    head, *rest = dotted.split(".")
    value = root.get(head)
    for part in rest:
        value = _unwrap(value)
        value = getattr(value, part, None) if isinstance(value, mat_struct) else None
    return value


def _text(value: Any) -> str | None:
    """A MATLAB char array as ``str`` (``None`` for anything else, e.g. an empty field)."""
    value = _unwrap(value)
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind == "U" and value.size == 1:
        return str(value.reshape(-1)[0])
    return None


def _take(name: str, raw: np.ndarray, layout: MatLayout, dims: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.ndim != 2:
        raise ValueError(f"{name}: layout {layout.name!r} expects a 2-D array, got shape {arr.shape}")
    if layout.channels_first:
        arr = arr.T  # (C, T) -> (T, C)
    if dims is not None:
        bad = [d for d in dims if not -arr.shape[1] <= d < arr.shape[1]]
        if bad:
            raise ValueError(
                f"{name}: layout {layout.name!r} asks for dims {dims} but the array has {arr.shape[1]}"
            )
        arr = arr[:, list(dims)]
    return arr  # (T, D)


def _behaviour(root: dict[str, Any], layout: MatLayout) -> dict[str, np.ndarray]:
    """The layout's further series that this file holds (absent or empty ones left out)."""
    out: dict[str, np.ndarray] = {}
    for series in layout.behaviour:
        raw = root.get(series.key)
        if raw is not None and np.asarray(raw).size:
            out[series.name] = _take(series.name, raw, layout, series.dims)
    return out


def _uniform_step(name: str, raw: Any) -> float:
    """The bin width of uniformly spaced time stamps, to the precision their dtype holds.

    Every step must equal the mean step within two units in the last place of the largest stamp
    (float32 stamps of a 20-minute recording are good to ±0.1 ms): a gap or a change of bin width
    is refused.  The mean step is rounded to the decimals that precision supports (float32 stamps
    0 … 1199.95 s over 24 000 bins give exactly 0.05)."""
    t = np.asarray(_numeric(name, raw)).ravel()
    if t.size < 2:
        raise ValueError(f"{name}: {t.size} time stamp(s) cannot give a bin width")
    _check_finite(name, t)
    stored = t.dtype if np.issubdtype(t.dtype, np.floating) else np.dtype(np.float64)
    ulp = float(np.spacing(np.abs(t).max().astype(stored)))
    t64 = t.astype(np.float64)
    steps = np.diff(t64)
    step = (t64[-1] - t64[0]) / (t.size - 1)
    if not step > 0 or np.abs(steps - step).max() > 2 * ulp:
        raise ValueError(
            f"{name}: bins are not uniform (steps from {steps.min() * 1e3:.4g} ms to "
            f"{steps.max() * 1e3:.4g} ms): a gap in the recording or a change of bin width"
        )
    return round(step, min(15, int(np.floor(-np.log10(ulp / (t.size - 1))))))


def _bin_width(root: dict[str, Any], layout: MatLayout) -> float:
    if layout.bin_s_key is not None:
        return _validate_bin_s(root[layout.bin_s_key])
    if layout.bin_s is not None:
        return _validate_bin_s(layout.bin_s)
    return _uniform_step(layout.timestamps_key, root[layout.timestamps_key])  # type: ignore[index]


def _counts_from_rates(name: str, rates: np.ndarray, bin_s: float) -> np.ndarray:
    """Spike counts from rates in Hz: rate × bin width, which must be whole in every bin."""
    counts = _numeric(name, rates).astype(np.float64) * bin_s
    _check_finite(name, counts)
    whole = np.rint(counts)
    frac = float(np.abs(counts - whole).max()) if counts.size else 0.0
    if frac > 1e-3:  # float32 rates of whole counts are exact to ~1e-6
        raise ValueError(
            f"{name}: rate × bin width ({bin_s * 1e3:g} ms) is not a whole spike count (off by up "
            f"to {frac:.3g}): these are smoothed rates, not binned counts"
        )
    return whole


def _counts(root: dict[str, Any], layout: MatLayout, bin_s: float) -> np.ndarray:
    counts = _take(layout.counts_key, root[layout.counts_key], layout, layout.counts_dims)  # (T, N)
    return _counts_from_rates(layout.counts_key, counts, bin_s) if layout.counts_in_hz else counts


def _session_name(root: dict[str, Any], layout: MatLayout, path: Path) -> str:
    original = _text(_lookup(root, layout.session_key))
    return PureWindowsPath(original).stem if original else path.stem  # a Windows path parses either way


def _recording_start(root: dict[str, Any], layout: MatLayout) -> datetime | None:
    text = _text(_lookup(root, layout.datetime_key))
    if text is None:
        return None
    try:
        return datetime.strptime(text.strip(), layout.datetime_format)
    except ValueError:
        raise ValueError(
            f"{layout.datetime_key}: {text!r} is not a date in the format {layout.datetime_format!r}"
        ) from None


def _named_groups(layout: MatLayout, names: tuple[str, ...]) -> dict[str, str]:
    """``subject``/``task``: the layout's constants, overridden by ``name_pattern``'s groups from
    the first of ``names`` (session name, then file stem) that supplies each."""
    out = {"subject": layout.subject, "task": layout.task}
    found: dict[str, str] = {}
    for name in names if layout.name_pattern else ():
        match = re.fullmatch(layout.name_pattern, name)
        for key, value in (match.groupdict() if match else {}).items():
            if key in out and value:
                found.setdefault(key, value)
    return {**out, **found}


def _mat_metadata(root: dict[str, Any], layout: MatLayout, path: Path) -> dict[str, Any]:
    """``session``/``subject``/``task``/``date_days`` keyword arguments, plus the start time."""
    name = _session_name(root, layout, path)
    meta: dict[str, Any] = {"session": name, **_named_groups(layout, (name, path.stem))}
    start = _recording_start(root, layout)
    if start is not None:
        meta["date_days"] = (start - datetime(1970, 1, 1)).total_seconds() / 86400.0
        meta["extra"] = {"session_start_time": start.isoformat()}
    return meta


def _mat_extras(root: dict[str, Any], layout: MatLayout, n_channels: int) -> dict[str, Any]:
    """Channel names and the trial table, where the layout names them and the file has them."""
    extra: dict[str, Any] = {"mat_layout": layout.name}
    names = _lookup(root, layout.channel_names_key)
    if names is not None and np.asarray(names).dtype.kind == "U":
        names = np.asarray(names).ravel()
        if layout.counts_dims is not None:
            names = names[list(layout.counts_dims)]
        if names.shape != (n_channels,):
            raise ValueError(f"{layout.channel_names_key}: {names.size} names for {n_channels} channels")
        extra["channel_names"] = names.astype(np.str_)
    trials = _lookup(root, layout.trials_key)
    if trials is not None and np.asarray(trials).size:
        extra["trials"] = np.asarray(_numeric(layout.trials_key, trials), dtype=np.float64)
    return extra


def load_mat(path: str | Path, *, layout: MatLayout | str | None = None) -> Session:
    """Load a MAT (v5) file through a :class:`MatLayout` (detected from its variables if ``None``).

    ``layout`` may be a record or the name of one in :data:`MAT_LAYOUTS`.  The session name is
    the layout's ``session_key`` stem where the file has one, else the file stem.  Timestamps,
    when the layout has them, are taken as given by the file.  Errors are ``ValueError`` naming
    the variable (or ``layout:``/``path:``), e.g. for a file no layout matches: what it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    found = _mat_variables(path)
    layout = _resolve_layout(layout, found, path)
    missing = sorted(layout.required_keys - set(found))
    if missing:
        raise ValueError(f"layout: {path.name} lacks variables {missing} required by layout {layout.name!r}")
    root = _read_root(path, layout, found)
    _check_keys(root, layout, path)
    bin_s = _bin_width(root, layout)
    counts = _counts(root, layout, bin_s)  # (T, N)
    meta = _mat_metadata(root, layout, path)
    extra = {**meta.pop("extra", {}), **_mat_extras(root, layout, counts.shape[1])}

    def series(name: str, key: str | None, dims: tuple[int, ...] | None) -> np.ndarray | None:
        return None if key is None else _take(name, root[key], layout, dims)  # (T, D)

    session = Session(
        counts=counts,
        bin_s=bin_s,
        velocity=series("velocity", layout.velocity_key, layout.velocity_dims),
        position=series("position", layout.position_key, layout.position_dims),
        behaviour=_behaviour(root, layout),
        timestamps=None if layout.timestamps_key is None else np.asarray(root[layout.timestamps_key]).ravel(),
        source=str(path),
        extra=extra,
        **meta,
    )
    return validate_session(session)


# --------------------------------------------------------------------------------------------
# NWB
# --------------------------------------------------------------------------------------------


def _series_times(ts: Any) -> np.ndarray:
    if ts.timestamps is not None:
        return np.asarray(ts.timestamps[:], dtype=np.float64)
    n = len(ts.data)
    return float(ts.starting_time or 0.0) + np.arange(n, dtype=np.float64) / float(ts.rate)


def _behaviour_series(nwb: Any) -> dict[str, Any]:
    """Every TimeSeries (incl. SpatialSeries) in processing/behavior and acquisition, by name.

    Containers such as ``BehavioralTimeSeries`` or ``Position`` are opened one level deep.
    """
    from pynwb import TimeSeries

    found: dict[str, Any] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, TimeSeries):
            found.setdefault(obj.name, obj)
            return
        for attr in ("time_series", "spatial_series"):
            children = getattr(obj, attr, None)
            if isinstance(children, dict):
                for child in children.values():
                    if isinstance(child, TimeSeries):
                        found.setdefault(child.name, child)

    if "behavior" in nwb.processing:
        for obj in nwb.processing["behavior"].data_interfaces.values():
            visit(obj)
    for obj in nwb.acquisition.values():
        visit(obj)
    return found


def _check_hdf5(path: Path, max_bytes: int | None) -> None:
    """Refuse an HDF5 file before any dataset is read: a link to another file, a dataset stored in
    external files or mapped from other files (reading them would read the reader's own files),
    or, with ``max_bytes``, a dataset (shape × dtype) or all of them together declaring more."""
    import h5py

    links: list[str] = []
    datasets: list[tuple[str, Any]] = []
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise ValueError("file: not a readable HDF5 (NWB) file") from None
    with f:  # the visitors only collect: an exception raised inside one breaks h5py's lock
        f.visititems_links(
            lambda name, info: links.append(name) if isinstance(info, h5py.ExternalLink) else None
        )
        f.visititems(
            lambda name, obj: datasets.append((name, obj)) if isinstance(obj, h5py.Dataset) else None
        )
        if links:
            raise ValueError(f"{_hdf5_field(links[0])}: links to another file, which is not accepted")
        total = 0
        for name, ds in datasets:
            if ds.is_virtual or ds.external:
                raise ValueError(f"{_hdf5_field(name)}: stored outside the file, which is not accepted")
            n = _npy_bytes(ds.shape or (), ds.dtype)
            _over_limit(_hdf5_field(name), n, max_bytes)
            total += n
    _over_limit("file", total, max_bytes, "its datasets declare {} uncompressed")


def _hdf5_field(name: str) -> str:
    """An HDF5 object's path inside the file, made safe to print on one line."""
    return "".join(c if c.isprintable() else "?" for c in name)[:120]


def load_nwb(
    path: str | Path,
    *,
    bin_s: float | None = None,
    velocity_series: str | None = None,
    max_bytes: int | None = None,
) -> Session:
    """Bin the ``Units`` spike times of an NWB file and attach a behaviour series as velocity -- or,
    for a file that holds binned counts (:data:`NWB_COUNTS`), read those (:func:`_read_binned`).

    ``bin_s``: the bin width for spike times (required for them); for binned counts it may be
    left out, and when given must equal the file's.

    Binning: bins are half-open ``[t0 + k*bin_s, t0 + (k+1)*bin_s)``.  With behaviour, ``t0`` is
    its first sample time and the bins cover as many whole bins as fit before its last sample
    (so every bin centre lies inside the behaviour time base); without behaviour, ``t0`` is the
    first spike and the bins run until the last spike is included.  Spikes outside the bins are
    dropped.  ``timestamps`` are the bin start times.

    Behaviour: the series named ``velocity_series`` (searched in ``processing/behavior``, one
    container level deep, then ``acquisition``); when ``None``, the unique series whose name
    contains "vel" (case-insensitive), or no velocity if there is none.  It is resampled onto the
    bin *centres* by linear interpolation per dimension -- a target label, not a model input, so
    using the samples around a centre leaks nothing into the decoder.  NaN samples are not
    repaired: they fail validation.

    Metadata: ``subject`` from ``nwb.subject.subject_id``, ``session`` from ``session_id`` (else
    the identifier); ``date_days`` is left at 0.0 and the start time is put in
    ``extra["session_start_time"]`` (ISO 8601) for the caller to turn into a relative date.

    ``max_bytes`` (for files from elsewhere, e.g. uploads): before pynwb opens the file, links to
    other files and datasets stored outside it are refused, and every dataset's declared size
    (shape × dtype), alone and summed, must fit; so must the binned arrays before they are made.
    ``None``: no checks.
    """
    try:
        from pynwb import NWBHDF5IO
    except ImportError as exc:
        raise ImportError("load_nwb needs pynwb: pip install 'rpnt[nwb]'") from exc

    bin_s = None if bin_s is None else _validate_bin_s(bin_s)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    if max_bytes is not None:
        _check_hdf5(path, max_bytes)
    with NWBHDF5IO(str(path), mode="r") as io:
        nwb = io.read()
        meta = _nwb_metadata(nwb, path)
        binned = _binned_counts_series(nwb)
        if binned is not None:
            return validate_session(
                Session(**_read_binned(nwb, binned, bin_s=bin_s, velocity_series=velocity_series), **meta)
            )
        if bin_s is None:
            raise ValueError(
                "bin_s: the file holds spike times (Units), which need a bin width to be binned at"
            )
        units = nwb.units
        if units is None or len(units) == 0:
            raise ValueError("units: the file has no Units table (or it is empty)")
        spikes = [
            np.asarray(units.get_unit_spike_times(i), dtype=np.float64).ravel() for i in range(len(units))
        ]

        series = _behaviour_series(nwb)
        chosen = None
        if velocity_series is not None:
            if velocity_series not in series:
                raise ValueError(
                    f"velocity_series: no series {velocity_series!r} in processing/behavior or acquisition; "
                    f"found {sorted(series)}"
                )
            chosen = series[velocity_series]
        else:
            cands = sorted(n for n in series if "vel" in n.lower())
            if len(cands) > 1:
                raise ValueError(
                    f"velocity_series: several candidates ({', '.join(cands)}); pass velocity_series="
                )
            if cands:
                chosen = series[cands[0]]

        beh_t = beh_x = None
        if chosen is not None:
            beh_t = _series_times(chosen)  # (M,)
            beh_x = np.asarray(chosen.data[:], dtype=np.float64)  # (M,) or (M, D)
            if beh_x.ndim == 1:
                beh_x = beh_x[:, None]
            if beh_x.ndim != 2 or beh_x.shape[0] != beh_t.shape[0]:
                raise ValueError(
                    f"velocity: series {chosen.name!r} has data {beh_x.shape} for {beh_t.shape[0]} times"
                )
            if beh_t.shape[0] < 2 or not (np.diff(beh_t) > 0).all():
                raise ValueError(f"velocity: series {chosen.name!r} needs ≥ 2 strictly increasing timestamps")

    if beh_t is not None:
        t0 = float(beh_t[0])
        n_bins = int(np.floor((beh_t[-1] - t0) / bin_s + 1e-9))
    else:
        nonempty = [s for s in spikes if s.size]
        if not nonempty:
            raise ValueError("units: no spikes and no behaviour series, cannot define a time base")
        t0 = float(min(s.min() for s in nonempty))
        n_bins = int(np.floor((max(s.max() for s in nonempty) - t0) / bin_s)) + 1
    if n_bins < 1:
        raise ValueError(f"bin_s: {bin_s} s is longer than the recording")
    per_bin = (
        4 * len(spikes) + 16 + (8 * beh_x.shape[1] if beh_x is not None else 0)
    )  # counts, edges, velocity
    _over_limit(
        "units",
        n_bins * per_bin,
        max_bytes,
        f"{n_bins} bins of {bin_s * 1e3:g} ms × {len(spikes)} units come to {{}}",
    )
    edges = t0 + bin_s * np.arange(n_bins + 1, dtype=np.float64)  # (T+1,)
    counts = np.zeros((n_bins, len(spikes)), dtype=np.int32)  # (T, N)
    for j, st in enumerate(spikes):
        idx = np.searchsorted(edges, st, side="right") - 1
        idx = idx[(idx >= 0) & (idx < n_bins)]
        counts[:, j] = np.bincount(idx, minlength=n_bins)

    velocity = None
    if beh_t is not None:
        centres = edges[:-1] + 0.5 * bin_s  # (T,)
        velocity = np.stack([np.interp(centres, beh_t, beh_x[:, d]) for d in range(beh_x.shape[1])], axis=1)

    session = Session(counts=counts, bin_s=bin_s, velocity=velocity, timestamps=edges[:-1].copy(), **meta)
    return validate_session(session)


def _nwb_metadata(nwb: Any, path: Path) -> dict[str, Any]:
    """Session metadata of an open NWB file (see :func:`load_nwb`)."""
    subject = ""
    if nwb.subject is not None and nwb.subject.subject_id is not None:
        subject = str(nwb.subject.subject_id)
    start = nwb.session_start_time.isoformat() if nwb.session_start_time is not None else ""
    return {
        "subject": subject,
        "session": str(nwb.session_id or nwb.identifier),
        "source": str(path),
        "extra": {"session_start_time": start, "session_description": str(nwb.session_description or "")},
    }


def _binned_counts_series(nwb: Any) -> Any | None:
    """The file's binned counts TimeSeries (:data:`NWB_COUNTS`), or None."""
    module, name = NWB_COUNTS
    if module not in nwb.processing or name not in nwb.processing[module].data_interfaces:
        return None
    return nwb.processing[module].data_interfaces[name]


def _read_binned(
    nwb: Any, counts_ts: Any, *, bin_s: float | None, velocity_series: str | None
) -> dict[str, Any]:
    """Counts, bin width, bin start times and behaviour of a file holding binned counts.

    The counts are read exactly; the bin width is ``1 / rate`` in whole nanoseconds (the daemon's
    bin clock).  Every TimeSeries in processing/behavior on the counts' time base (same rate and
    starting time, one row per bin) is read exactly, under its own name (``velocity``,
    ``position``, else a named behaviour series); ``velocity_series`` names one to read as
    velocity instead.  Series on another time base are not read."""
    if counts_ts.rate is None:
        raise ValueError(f"{'/'.join(NWB_COUNTS)}: needs a sampling rate (1 / bin width), not timestamps")
    file_bin_s = round(1e9 / float(counts_ts.rate)) / 1e9
    if bin_s is not None and abs(bin_s - file_bin_s) > 1e-9:
        raise ValueError(
            f"bin_s: the file holds counts binned at {file_bin_s * 1e3:g} ms, not {bin_s * 1e3:g} ms"
        )
    counts = np.asarray(counts_ts.data[:])  # (T, N)
    t0 = float(counts_ts.starting_time or 0.0)
    n_bins = counts.shape[0] if counts.ndim else 0
    series: dict[str, np.ndarray] = {}
    if NWB_BEHAVIOUR in nwb.processing:
        for name, ts in nwb.processing[NWB_BEHAVIOUR].data_interfaces.items():
            if (
                getattr(ts, "rate", None) is not None
                and abs(float(ts.rate) - float(counts_ts.rate)) < 1e-9
                and float(ts.starting_time or 0.0) == t0
                and len(ts.data) == n_bins
            ):
                x = np.asarray(ts.data[:])
                series[name] = x[:, None] if x.ndim == 1 else x
    if velocity_series is not None:
        if velocity_series not in series:
            raise ValueError(
                f"velocity_series: no series {velocity_series!r} on the binned counts' time base in "
                f"processing/{NWB_BEHAVIOUR}; found {sorted(series)}"
            )
        series["velocity"] = series.pop(velocity_series)
    return {
        "counts": counts,
        "bin_s": file_bin_s,
        "timestamps": t0 + file_bin_s * np.arange(n_bins, dtype=np.float64),
        "velocity": series.pop("velocity", None),
        "position": series.pop("position", None),
        "behaviour": series,
    }


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------

_LOADERS = {".npz": load_npz, ".mat": load_mat, ".nwb": load_nwb}


def load_session(path: str | Path, **kw: Any) -> Session:
    """Load a session by file suffix: ``.npz`` → :func:`load_npz`, ``.mat`` → :func:`load_mat`,
    ``.nwb`` → :func:`load_nwb` (keyword arguments are passed through, e.g. ``bin_s=`` for NWB).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unknown suffix.
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
