"""MAT (v5) files read through a :class:`~rpnt_core.data.mat_layouts.MatLayout`.

The layout is detected from the variable names in the file when not given (only the variable
table is read for that); a file no layout matches is refused with one line saying what it holds.
Every failure is a ``ValueError`` naming the variable (or ``layout:``/``path:``).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from rpnt_core.data.mat_layouts import MAT_LAYOUTS, MatLayout
from rpnt_core.data.session import Session
from rpnt_core.data.validate import check_finite, numeric_array, validate_bin_s, validate_session

__all__ = ["load_mat"]

Variables = dict[str, tuple[tuple[int, ...], str]]  # name → (shape, MATLAB class)


def _describe_layouts() -> str:
    return "; ".join(lay.describe() for lay in MAT_LAYOUTS.values())


def _describe_variable(name: str, shape: tuple[int, ...], cls: str) -> str:
    return f"{name} {'×'.join(map(str, shape))} {cls}"


def _describe_variables(found: Variables, most: int = 12) -> str:
    """``"S 5×30 double, V 3×30 double"``: the first ``most`` variables by name, then a count."""
    names = sorted(found)
    shown = ", ".join(_describe_variable(n, *found[n]) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _mat_variables(path: Path) -> Variables:
    """{name: (shape, MATLAB class)} of the top-level variables, without reading the data."""
    from scipy.io import whosmat
    from scipy.io.matlab import MatReadError

    try:
        return {name: (tuple(shape), cls) for name, shape, cls in whosmat(path)}
    except NotImplementedError:
        raise ValueError(f"path: {path.name} is a MAT v7.3 (HDF5) file; only MAT v5 is supported") from None
    except (ValueError, OSError, MatReadError) as exc:
        raise ValueError(f"path: {path.name} is not a readable MAT v5 file ({exc})") from None


def _detect_layout(found: Variables, path: Path) -> MatLayout:
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


def _resolve_layout(layout: MatLayout | str | None, found: Variables, path: Path) -> MatLayout:
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


def _read_root(path: Path, layout: MatLayout, found: Variables) -> dict[str, Any]:
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
    t = np.asarray(numeric_array(name, raw)).ravel()
    if t.size < 2:
        raise ValueError(f"{name}: {t.size} time stamp(s) cannot give a bin width")
    check_finite(name, t)
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
        return validate_bin_s(root[layout.bin_s_key])
    if layout.bin_s is not None:
        return validate_bin_s(layout.bin_s)
    return _uniform_step(layout.timestamps_key, root[layout.timestamps_key])  # type: ignore[index]


def _counts_from_rates(name: str, rates: np.ndarray, bin_s: float) -> np.ndarray:
    """Spike counts from rates in Hz: rate × bin width, which must be whole in every bin."""
    counts = numeric_array(name, rates).astype(np.float64) * bin_s
    check_finite(name, counts)
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
        extra["trials"] = np.asarray(numeric_array(layout.trials_key, trials), dtype=np.float64)
    return extra


def load_mat(path: str | Path, *, layout: MatLayout | str | None = None) -> Session:
    """Load a MAT (v5) file through a :class:`MatLayout`.

    The session name is the layout's ``session_key`` stem where the file has one, else the file
    stem.  Timestamps, when the layout has them, are taken as given by the file.

    Args:
        path: the ``.mat`` file.
        layout: a record, the name of one in :data:`MAT_LAYOUTS`, or ``None`` to detect it from
            the file's variables.
    Returns:
        The validated :class:`Session`; ``extra["mat_layout"]`` names the layout, and
        ``extra`` holds the channel names, trial table and start time where the layout names them.
    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: naming the variable (or ``layout:``/``path:``), e.g. for a file no layout
            matches: what it holds.
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
