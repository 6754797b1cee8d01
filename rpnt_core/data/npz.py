"""The NPZ interchange format: one session per ``.npz`` file, read without unpickling.

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
``timestamps`` is ``float64`` (:func:`~rpnt_core.data.validate.validate_session`).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from rpnt_core.data.limits import array_bytes, check_limit
from rpnt_core.data.session import Session
from rpnt_core.data.validate import validate_session

__all__ = ["NOT_NPZ", "NPZ_MAGIC", "load_npz", "save_npz"]

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

    Counts are stored in the smallest unsigned integer dtype that holds them.

    Args:
        session: the session to write (validated first).
        path: the file to write; its parent folders are made.  No ``.npz`` suffix is appended.
        include_extra: also store every ``Session.extra`` entry as ``extra_<key>``.
    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    Raises:
        ValueError: from :func:`~rpnt_core.data.validate.validate_session`, or for an ``extra``
            entry that is not a numeric/bool/string array or scalar under an identifier key.
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
        out.update(_extra_arrays(s.extra))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # an open file keeps numpy from appending ".npz"
        np.savez_compressed(fh, **out)
    return path


def _extra_arrays(extra: dict[str, Any]) -> dict[str, np.ndarray]:
    """``Session.extra`` as ``extra_<key>`` arrays that load without unpickling."""
    out: dict[str, np.ndarray] = {}
    for key, value in extra.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"extra[{key!r}]: keys must be identifier strings to be stored")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biufcU":
            raise ValueError(f"extra[{key!r}]: cannot store dtype {arr.dtype} without pickling")
        out[_EXTRA_PREFIX + key] = arr
    return out


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


def _check_headers(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], max_bytes: int | None) -> None:
    """Every member's declarations against ``max_bytes``, before any array is read.

    A member is refused when its zip entry (``ZipInfo.file_size``) or its ``.npy`` header (shape ×
    dtype) declares more than the limit, when all of them together do, when it holds Python objects
    (they need unpickling), or when the two declarations disagree (the entry is too short for the
    array it says it holds)."""
    for key, info in members.items():
        check_limit(key, info.file_size, max_bytes)
    check_limit(
        "file", sum(i.file_size for i in members.values()), max_bytes, "its arrays declare {} uncompressed"
    )
    sizes: dict[str, int] = {}
    for key, info in members.items():
        shape, dtype, header = _npy_header(zf, key, info)
        if dtype.hasobject:
            raise ValueError(f"{key}: object arrays are not accepted (reading them would mean unpickling)")
        sizes[key] = array_bytes(shape, dtype)
        check_limit(key, sizes[key], max_bytes)
        if header + sizes[key] > info.file_size:
            raise ValueError(f"{key}: damaged: the archive holds fewer bytes than its .npy header declares")
    check_limit("file", sum(sizes.values()), max_bytes, "its arrays declare {} uncompressed")


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

    This is the one NPZ reader (the CLI and the service's uploads both come here).  With a limit,
    every declared size (each zip entry's and each ``.npy`` header's, alone and summed) is checked
    before any array is read, and each member then inflates only the bytes its header declares
    (plus the zip reader's 4 KB read-ahead), so no more than ``max_bytes`` is ever inflated,
    whatever the archive claims.

    Args:
        path: the ``.npz`` file.
        max_bytes: the most bytes the arrays may declare, alone and together; ``None``: no limit.
    Returns:
        The validated :class:`Session`, ``source`` set to ``str(path)``.
    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: message starting with the field (an array's name, or ``file``), never
            containing the path: :data:`NOT_NPZ` for a file that is not a zip archive; a damaged
            archive or member; a member that is not ``<field>.npy``, an unknown field, one stored
            twice, encrypted or compressed other than stored/deflated; an object array; a size over
            ``max_bytes``; a missing ``counts`` or ``bin_s``; then
            :func:`~rpnt_core.data.validate.validate_session`'s checks.
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
