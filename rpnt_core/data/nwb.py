"""NWB files: ``Units`` spike times binned, or binned counts read as they are.

:func:`load_nwb` bins ``Units`` spike times and resamples a behaviour time series onto the bins.
A file that already holds binned counts -- a TimeSeries ``binned_counts`` in
``processing/ecephys`` with a sampling rate (what ``rpnt replay --nwb`` and ``rpnt serve``'s
session recording write, :data:`NWB_COUNTS`) -- is read as it is instead: the counts exactly, the
bin width from the rate, and the behaviour series on the same time base exactly (docs/nwb.md).
It needs the optional extra ``pip install 'rpnt[nwb]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rpnt_core.data.limits import array_bytes, check_limit
from rpnt_core.data.session import Session
from rpnt_core.data.validate import validate_bin_s, validate_session

__all__ = ["NWB_BEHAVIOUR", "NWB_COUNTS", "load_nwb"]

#: where an NWB file keeps binned spike counts: (processing module, TimeSeries name); the series is
#: (T, N) integer counts with ``rate`` = 1 / bin width.  Behaviour series per bin live in
#: processing/behavior (:data:`NWB_BEHAVIOUR`), each named as the session names it (velocity, …).
NWB_COUNTS = ("ecephys", "binned_counts")
NWB_BEHAVIOUR = "behavior"


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
            n = array_bytes(ds.shape or (), ds.dtype)
            check_limit(_hdf5_field(name), n, max_bytes)
            total += n
    check_limit("file", total, max_bytes, "its datasets declare {} uncompressed")


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

    Args:
        path: the ``.nwb`` file.
        bin_s: the bin width for spike times (required for them); for binned counts it may be
            left out, and when given must equal the file's.
        velocity_series: the behaviour series to read as velocity (see above).
        max_bytes: for files from elsewhere (e.g. uploads): before pynwb opens the file, links to
            other files and datasets stored outside it are refused, and every dataset's declared
            size (shape × dtype), alone and summed, must fit; so must the binned arrays before
            they are made.  ``None``: no checks.
    Returns:
        The validated :class:`Session`.
    Raises:
        ImportError: pynwb is not installed.
        FileNotFoundError: ``path`` is not a file.
        ValueError: naming the field, for anything the file lacks or holds wrongly.
    """
    try:
        from pynwb import NWBHDF5IO
    except ImportError as exc:
        raise ImportError("load_nwb needs pynwb: pip install 'rpnt[nwb]'") from exc

    bin_s = None if bin_s is None else validate_bin_s(bin_s)
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
        spikes = _unit_spike_times(nwb)
        behaviour = _velocity_samples(_choose_velocity(_behaviour_series(nwb), velocity_series))
    return validate_session(
        Session(**_bin_units(spikes, behaviour, bin_s=bin_s, max_bytes=max_bytes), **meta)
    )


def _unit_spike_times(nwb: Any) -> list[np.ndarray]:
    """Each unit's spike times in seconds, float64 (one array per unit)."""
    units = nwb.units
    if units is None or len(units) == 0:
        raise ValueError("units: the file has no Units table (or it is empty)")
    return [np.asarray(units.get_unit_spike_times(i), dtype=np.float64).ravel() for i in range(len(units))]


def _choose_velocity(series: dict[str, Any], velocity_series: str | None) -> Any | None:
    """The series named ``velocity_series``, else the unique one named like velocity, else None."""
    if velocity_series is not None:
        if velocity_series not in series:
            raise ValueError(
                f"velocity_series: no series {velocity_series!r} in processing/behavior or acquisition; "
                f"found {sorted(series)}"
            )
        return series[velocity_series]
    cands = sorted(n for n in series if "vel" in n.lower())
    if len(cands) > 1:
        raise ValueError(f"velocity_series: several candidates ({', '.join(cands)}); pass velocity_series=")
    return series[cands[0]] if cands else None


def _velocity_samples(chosen: Any | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The chosen series' (times (M,), samples (M, D)) in float64, checked; None without one."""
    if chosen is None:
        return None
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
    return beh_t, beh_x


def _time_base(
    spikes: list[np.ndarray], behaviour: tuple[np.ndarray, np.ndarray] | None, bin_s: float
) -> tuple[float, int]:
    """(first bin start ``t0``, number of bins), as :func:`load_nwb` defines them."""
    if behaviour is not None:
        beh_t = behaviour[0]
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
    return t0, n_bins


def _bin_units(
    spikes: list[np.ndarray],
    behaviour: tuple[np.ndarray, np.ndarray] | None,
    *,
    bin_s: float,
    max_bytes: int | None,
) -> dict[str, Any]:
    """Session arrays from spike times and an optional velocity series (times (M,), samples (M, D)).

    Returns:
        ``counts`` (T, N) int32, ``bin_s``, ``velocity`` (T, D) float64 or None, ``timestamps``
        (T,) bin starts.
    """
    t0, n_bins = _time_base(spikes, behaviour, bin_s)
    per_bin = 4 * len(spikes) + 16 + (8 * behaviour[1].shape[1] if behaviour is not None else 0)
    check_limit(  # counts, edges, velocity
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
    if behaviour is not None:
        beh_t, beh_x = behaviour
        centres = edges[:-1] + 0.5 * bin_s  # (T,)
        velocity = np.stack([np.interp(centres, beh_t, beh_x[:, d]) for d in range(beh_x.shape[1])], axis=1)
    return {"counts": counts, "bin_s": bin_s, "velocity": velocity, "timestamps": edges[:-1].copy()}


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
