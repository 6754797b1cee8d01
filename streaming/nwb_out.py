"""A decoded session as an NWB file: what ``rpnt replay --nwb`` and ``rpnt serve``'s session
recording (``record.nwb``) write.  Layout (docs/nwb.md), one row per decoded bin, in order::

    processing/ecephys/binned_counts   TimeSeries (T, N) int32, unit "spikes", rate 1/Δ
    processing/behavior/<name>         TimeSeries (T, D_k) float32: the recorded behaviour per bin
                                       (the series a replay carried; the KINEMATICS a rig streamed)
    processing/misc/<target>           TimeSeries (T, D) float32: the decoded target (velocity,
                                       position, …), NaN where no prediction came back
    processing/misc/decoder_bins       DynamicTable, a row per bin: epoch, bin, received, flags,
                                       n_spikes, generation, model_version, and the per-stage
                                       latencies <stage>_ns (int64 ns; −1 where there is no value)

The model version(s) are also in the file's ``notes`` and the misc module's description.

Every TimeSeries starts at ``starting_time`` with rate 1/Δ, so ``rpnt_core.data.load_nwb`` (and
``rpnt evaluate``, ``rpnt replay``) reads the counts and the behaviour back exactly.  The file is
written to a temporary name beside ``path`` and renamed into place: a reader never sees half a
file.  pynwb is imported by :func:`write_nwb` only.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from rpnt_core.data.formats import NWB_BEHAVIOUR, NWB_COUNTS

from .protocol import PredFlag

MISC = "misc"
BINS_TABLE = "decoder_bins"
KEYWORDS = ["brain-computer interface", "neural decoding", "closed loop", "rpnt"]


@dataclass(frozen=True, kw_only=True)
class DecodedSession:
    """What one run decoded, per bin (T rows, in decode order).

    ``latency_ns``: stage name → (T,) int64 ns, −1 where there is no value.  ``model_versions``:
    decoder generation → model version.  ``labels``: recorded behaviour series by name, (T, D_k)
    each, complete (a series with gaps is not a label)."""

    bin_ns: int
    target: str
    counts: np.ndarray  # (T, N) integer
    decoded: np.ndarray  # (T, D) float32, NaN where no prediction
    received: np.ndarray  # (T,) bool
    flags: np.ndarray  # (T,) int
    n_spikes: np.ndarray  # (T,) int, −1 where unknown
    epoch: np.ndarray  # (T,) int
    bin: np.ndarray  # (T,) int
    generation: np.ndarray  # (T,) int, −1 where no prediction
    model_versions: dict[int, str]
    latency_ns: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    starting_time: float = 0.0
    description: str = "rpnt decoded session"
    session_id: str = ""
    subject: str = ""

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])


def write_nwb(path: str | Path, ds: DecodedSession) -> Path:
    """Write ``ds`` to ``path`` (the layout in the module docstring) atomically; returns the path.

    Raises ``ValueError`` naming the field for arrays that do not fit together, ``ImportError``
    (saying how to install it) without pynwb, ``OSError`` when the folder cannot be written."""
    _check(ds)
    try:
        import pynwb  # noqa: F401
    except ImportError as exc:
        raise ImportError("NWB output needs pynwb: pip install 'rpnt[nwb]'") from exc
    from pynwb import NWBHDF5IO

    path = Path(path)
    nwb = _build(ds)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.nwb")
    try:
        with NWBHDF5IO(str(tmp), mode="w") as io:
            io.write(nwb)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check(ds: DecodedSession) -> None:
    T = ds.n_bins
    if ds.counts.ndim != 2 or T < 1:
        raise ValueError(f"counts: expected (T, N) with T ≥ 1, got shape {ds.counts.shape}")
    if ds.decoded.ndim != 2 or ds.decoded.shape[0] != T:
        raise ValueError(f"decoded: expected ({T}, D), got shape {ds.decoded.shape}")
    for name in ("received", "flags", "n_spikes", "epoch", "bin", "generation"):
        if getattr(ds, name).shape != (T,):
            raise ValueError(f"{name}: expected ({T},), got shape {getattr(ds, name).shape}")
    for name, v in {**ds.latency_ns, **ds.labels}.items():
        if v.shape[0] != T:
            raise ValueError(f"{name}: {v.shape[0]} rows, the session has {T} bins")
    if ds.bin_ns < 1:
        raise ValueError(f"bin_ns: must be ≥ 1, got {ds.bin_ns}")


def _versions_text(ds: DecodedSession) -> str:
    return ", ".join(f"{v} (generation {g})" for g, v in sorted(ds.model_versions.items())) or "none"


def _packed(data):
    """``data`` stored gzip-compressed (per-bin arrays of long sessions are mostly repetition)."""
    from hdmf.backends.hdf5 import H5DataIO

    return H5DataIO(data, compression="gzip")


def _build(ds: DecodedSession):
    """The in-memory NWBFile of ``ds`` (the layout in the module docstring)."""
    nwb = _new_file(ds)
    bin_ms = f"{ds.bin_ns / 1e6:g} ms"
    ecephys = nwb.create_processing_module(
        NWB_COUNTS[0], f"spike counts per {bin_ms} bin, as the decoder saw them"
    )
    ecephys.add(
        _series(
            ds,
            NWB_COUNTS[1],
            _packed(np.asarray(ds.counts, dtype=np.int32)),
            unit="spikes",
            description=f"spike counts (bins × channels), {bin_ms} bins; one row per decoded bin",
            continuity="step",
        )
    )
    if ds.labels:
        beh = nwb.create_processing_module(NWB_BEHAVIOUR, "recorded behaviour, one row per decoded bin")
        for name, v in ds.labels.items():
            v = np.asarray(v, dtype=np.float32)
            beh.add(
                _series(
                    ds,
                    name,
                    _packed(v),
                    unit="a.u.",
                    description=f"recorded {name} ({v.shape[1]} dims) per bin",
                )
            )
    misc = nwb.create_processing_module(MISC, f"rpnt decoder output; model version(s): {_versions_text(ds)}")
    D = ds.decoded.shape[1]
    misc.add(
        _series(
            ds,
            ds.target,
            _packed(np.asarray(ds.decoded, dtype=np.float32)),
            unit="a.u.",
            description=f"decoded {ds.target} ({D} dims) per bin, NaN where no prediction came back",
            comments=f"target={ds.target}; dims={D}",
        )
    )
    misc.add(_bins_table(ds))
    return nwb


def _new_file(ds: DecodedSession):
    from pynwb import NWBFile
    from pynwb.file import Subject

    return NWBFile(
        session_description=ds.description,
        identifier=str(uuid.uuid4()),
        session_start_time=datetime.now(timezone.utc),
        session_id=ds.session_id or None,
        source_script="rpnt",
        source_script_file_name="streaming/nwb_out.py",
        notes=f"decoded by rpnt; model version(s): {_versions_text(ds)}",
        keywords=KEYWORDS,
        experiment_description=f"real-time decoding of {ds.target} from binned spike counts by rpnt",
        subject=Subject(subject_id=ds.subject) if ds.subject else None,
    )


def _series(ds: DecodedSession, name: str, data, *, unit: str, description: str, **kw):
    """A TimeSeries with one row per bin of ``ds``: rate 1/Δ from ``ds.starting_time``."""
    from pynwb import TimeSeries

    return TimeSeries(
        name=name,
        data=data,
        unit=unit,
        rate=1e9 / ds.bin_ns,
        starting_time=float(ds.starting_time),
        description=description,
        **kw,
    )


def _bins_table(ds: DecodedSession):
    """The ``decoder_bins`` DynamicTable: per bin its epoch, bin, flags, generation, version, latencies."""
    from hdmf.common import DynamicTable, VectorData

    flag_doc = ", ".join(f"{f.name}={int(f)}" for f in PredFlag)
    cols = [
        ("epoch", ds.epoch, np.int64, "stream (the daemon's epoch; a RESET starts the next)"),
        ("bin", ds.bin, np.int64, "bin index within its stream"),
        ("received", ds.received, bool, "whether a prediction came back for the bin"),
        ("flags", ds.flags, np.int64, f"prediction flags, bits: {flag_doc}"),
        ("n_spikes", ds.n_spikes, np.int64, "spikes the daemon counted into the bin (−1: unknown)"),
        (
            "generation",
            ds.generation,
            np.int64,
            "decoder generation that decoded the bin (a swap starts the next; −1: no prediction)",
        ),
        (
            "model_version",
            [ds.model_versions.get(int(g), "") for g in ds.generation],
            None,
            "model version (weights hash) that decoded the bin (empty: no prediction)",
        ),
    ]
    cols += [
        (f"{stage}_ns", v, np.int64, f"latency of stage {stage} in ns (−1: no value)")
        for stage, v in ds.latency_ns.items()
    ]
    return DynamicTable(
        name=BINS_TABLE,
        description="one row per decoded bin: flags, latencies, generation",
        columns=[
            VectorData(name=n, data=_packed(v if dt is None else np.asarray(v, dtype=dt)), description=d)
            for n, v, dt, d in cols
        ],
    )


def from_replay(
    res,
    *,
    counts: np.ndarray,
    labels: dict[str, np.ndarray] | None = None,
    starting_time: float = 0.0,
    description: str = "rpnt replay",
    session_id: str = "",
    subject: str = "",
) -> DecodedSession:
    """The :class:`DecodedSession` of a replay (:class:`~streaming.replay.ReplayResult`) of ``counts``
    (T, N) with the recorded ``labels`` it carried.  Latencies: every stage of the replay report
    (:func:`~streaming.report.stage_arrays`), −1 for bins it leaves out (not received, STALLED)."""
    from .report import stage_arrays

    T = res.n_bins
    return DecodedSession(
        bin_ns=int(res.bin_ns),
        target=res.target,
        counts=np.asarray(counts),
        decoded=res.velocity,
        received=res.received,
        flags=res.flags,
        n_spikes=res.n_spikes,
        epoch=np.full(T, res.epoch, np.int64),
        bin=np.arange(T, dtype=np.int64),
        generation=res.generation,
        model_versions=dict(res.versions_by_generation),
        latency_ns=stage_arrays(res, per_bin=True),
        labels=dict(labels or {}),
        starting_time=float(starting_time),
        description=description,
        session_id=session_id,
        subject=subject,
    )
