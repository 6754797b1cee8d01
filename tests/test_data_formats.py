"""NPZ interchange format, session validation, MAT layouts, NWB binning, suffix dispatch."""

from __future__ import annotations

import re
import sys
import tracemalloc
import zipfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import crafted
import numpy as np
import pytest

from rpnt_core.data import (
    MAT_LAYOUTS,
    MatLayout,
    Session,
    load_mat,
    load_npz,
    load_nwb,
    load_session,
    save_npz,
    session_files,
    validate_session,
)
from rpnt_core.data.npz import NOT_NPZ

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STEVENSON = SHARED_DATA / "stevenson2011_m1_centerout" / "StevensonV2.mat"
CONTDATA = SHARED_DATA / "contdata95_bme517" / "contdata95.mat"


def make_session(*, T: int = 50, N: int = 7, S: int | None = None, seed: int = 0) -> Session:
    rng = np.random.default_rng(seed)
    shape = (T, N) if S is None else (S, T, N)
    return Session(
        counts=rng.poisson(1.0, size=shape).astype(np.int64),  # (T, N) or (S, T, N)
        bin_s=0.02,
        velocity=rng.normal(size=(T, 2)),  # (T, 2)
        position=rng.normal(size=(T, 2)),  # (T, 2)
        timestamps=10.0 + 0.02 * np.arange(T),  # (T,)
        site_xy=None if S is None else rng.normal(size=(S, 2)),  # (S, 2)
        subject="monkey-J",
        session="2024-01-02",
        task="center-out",
        date_days=3.5,
    )


# ------------------------------------------------------------------------------------ NPZ


@pytest.mark.parametrize("S", [None, 3])
def test_npz_round_trip(tmp_path: Path, S: int | None) -> None:
    s = make_session(S=S)
    path = save_npz(s, tmp_path / "a.npz")
    assert path == tmp_path / "a.npz" and path.exists()
    back = load_npz(path)
    assert back.counts.dtype == np.int32
    np.testing.assert_array_equal(back.counts, s.counts)
    np.testing.assert_allclose(back.velocity, s.velocity, rtol=1e-6)
    np.testing.assert_allclose(back.position, s.position, rtol=1e-6)
    np.testing.assert_array_equal(back.timestamps, s.timestamps)
    if S is not None:
        np.testing.assert_allclose(back.site_xy, s.site_xy, rtol=1e-6)
        assert back.multisite
    else:
        assert back.site_xy is None
    assert (back.subject, back.session, back.task, back.date_days, back.bin_s) == (
        "monkey-J",
        "2024-01-02",
        "center-out",
        3.5,
        0.02,
    )
    assert back.source == str(path)
    assert back.fingerprint() == validate_session(s).fingerprint()
    assert load_session(path).fingerprint() == back.fingerprint()


def test_npz_minimal_and_extras(tmp_path: Path) -> None:
    s = Session(
        counts=np.ones((4, 2), dtype=np.uint8),
        bin_s=0.05,
        extra={"latents": np.arange(8.0).reshape(4, 2), "note": "hi", "k": 3},
    )
    back = load_npz(save_npz(s, tmp_path / "m.npz", include_extra=True))
    assert back.velocity is None and back.timestamps is None and back.subject == ""
    np.testing.assert_array_equal(back.extra["latents"], s.extra["latents"])
    assert str(back.extra["note"]) == "hi" and int(back.extra["k"]) == 3
    assert load_npz(save_npz(s, tmp_path / "n.npz")).extra == {}
    with pytest.raises(ValueError, match=r"extra\['bad'\]"):
        save_npz(replace(s, extra={"bad": {"a": 1}}), tmp_path / "x.npz", include_extra=True)


def test_npz_strings_are_0d_unicode(tmp_path: Path) -> None:
    path = save_npz(make_session(), tmp_path / "a.npz")
    with np.load(path, allow_pickle=False) as z:
        for k in ("subject", "session", "task"):
            assert z[k].ndim == 0 and z[k].dtype.kind == "U"
        assert z["counts"].dtype == np.uint8


def test_npz_rejects_unknown_keys_and_pickles(tmp_path: Path) -> None:
    np.savez(tmp_path / "typo.npz", counts=np.ones((3, 2), int), bin_s=0.02, velocities=np.ones((3, 2)))
    with pytest.raises(ValueError, match="unknown keys.*velocities"):
        load_npz(tmp_path / "typo.npz")
    np.savez(tmp_path / "obj.npz", counts=np.array([object()], dtype=object), bin_s=0.02)
    with pytest.raises(ValueError, match="pickl"):
        load_npz(tmp_path / "obj.npz")
    with open(tmp_path / "single.npz", "wb") as fh:  # a lone .npy is no archive of named fields
        np.save(fh, np.ones((3, 2)))
    with pytest.raises(ValueError, match=f"^{re.escape(NOT_NPZ)}$"):
        load_npz(tmp_path / "single.npz")
    np.savez(tmp_path / "nobin.npz", counts=np.ones((3, 2), int))
    with pytest.raises(ValueError, match="^bin_s: missing"):
        load_npz(tmp_path / "nobin.npz")


def test_a_file_that_is_not_a_zip_gets_one_message_not_numpys(tmp_path: Path) -> None:
    # numpy.load would try to unpickle it and say "Cannot load file containing pickled data"
    for name, data in (
        ("text.npz", b"counts,bin_s\n1,0.02\n"),
        ("pickle.npz", b"\x80\x04K\x01."),
        ("hdf5.npz", b"\x89HDF\r\n\x1a\n" + bytes(100)),
    ):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_npz(tmp_path / name)
        assert str(e.value) == NOT_NPZ
        assert "pickl" not in str(e.value) and str(tmp_path) not in str(e.value)


def test_an_object_array_is_named_without_the_path(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(
        path, counts=np.ones((3, 2), int), bin_s=0.02, velocity=np.array([[object()] * 2] * 3, dtype=object)
    )
    with pytest.raises(ValueError) as e:
        load_npz(path)
    assert str(e.value) == "velocity: object arrays are not accepted (reading them would mean unpickling)"


LIMIT = 1 << 20  # 1 MB


def _inflated_peak(path: Path, max_bytes: int | None) -> tuple[int, str]:
    """(peak bytes allocated while loading ``path``, the error it raised): numpy's array buffers and
    the zip reader's inflated chunks are both traced by tracemalloc."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as e:
            load_npz(path, max_bytes=max_bytes)
        return tracemalloc.get_traced_memory()[1], str(e.value)
    finally:
        tracemalloc.stop()


def test_zip_bombs_are_refused_before_inflating_more_than_the_limit(tmp_path: Path) -> None:
    honest = crafted.npz_zip_bomb(tmp_path / "honest.npz", 64)  # 64 MB of zeros in about 70 KB
    assert honest.stat().st_size < 100_000
    lying_header = crafted.npz_lying_header(
        tmp_path / "header.npz", (600_000_000,)
    )  # says 2.2 GB, holds 16 B
    lying_zip = crafted.npz_lying_zip_size(tmp_path / "zip.npz", 64)  # says 4 KB, inflates to 64 MB
    cases = [
        (honest, "counts: declares 64 MB uncompressed, over the 1 MB limit"),
        (lying_header, "counts: declares 2.2 GB uncompressed, over the 1 MB limit"),
        (lying_zip, "counts: damaged data in the archive"),
    ]
    for path, message in cases:
        peak, error = _inflated_peak(path, LIMIT)
        assert error == message, path.name
        assert peak < LIMIT, (path.name, peak)
    # the measurement sees inflation: without a limit the honest bomb is inflated (then refused as 1-D)
    peak, error = _inflated_peak(honest, None)
    assert peak >= 64 << 20 and error.startswith("counts: expected 2-D")


def test_all_members_together_are_held_to_the_limit(tmp_path: Path) -> None:
    path = crafted.write_zip(
        tmp_path / "sum.npz",
        [
            crafted.deflated("counts.npy", crafted.npy(np.zeros((1000, 400), np.uint8))),  # 400 KB
            crafted.deflated("position.npy", crafted.npy(np.zeros((1000, 100), np.float32))),  # 400 KB
            crafted.deflated("velocity.npy", crafted.npy(np.zeros((1000, 100), np.float32))),  # 400 KB
            *crafted.session_members()[:1],
        ],
    )
    peak, error = _inflated_peak(path, LIMIT)
    assert error == "file: its arrays declare 1.1 MB uncompressed, over the 1 MB limit" and peak < LIMIT


def test_npz_members_numpy_never_writes_are_refused(tmp_path: Path) -> None:
    counts = crafted.npy(np.ones((3, 2), np.int32))
    bz = tmp_path / "bz.npz"  # bzip2 inflates a whole read at once, whatever was asked for
    with zipfile.ZipFile(bz, "w", compression=zipfile.ZIP_BZIP2) as z:
        z.writestr("counts.npy", counts)
    stray = crafted.write_zip(
        tmp_path / "stray.npz",
        [crafted.deflated("counts.npy", counts), crafted.deflated("notes.txt", b"hello")],
    )
    twice = crafted.write_zip(tmp_path / "twice.npz", [crafted.deflated("counts.npy", counts)] * 2)
    cut = tmp_path / "cut.npz"
    np.savez(cut, counts=np.ones((300, 2)), bin_s=0.02)
    cut.write_bytes(cut.read_bytes()[:2000])
    short = crafted.write_zip(tmp_path / "short.npz", [crafted.deflated("counts.npy", counts[:-8])])
    for path, message in (
        (bz, "counts: compressed with an unsupported method (NPZ arrays are stored or deflated)"),
        (stray, "file: the archive holds a member that is not a <field>.npy array"),
        (twice, "counts: stored twice in the archive"),
        (cut, "file: a damaged or truncated NPZ file (its zip directory cannot be read)"),
        (short, "counts: damaged: the archive holds fewer bytes than its .npy header declares"),
    ):
        with pytest.raises(ValueError) as e:
            load_npz(path, max_bytes=LIMIT)
        assert str(e.value) == message, path.name


# ------------------------------------------------------------------------------------ validation

T = 50
BAD_FIELDS = [
    # (field overrides, expected message start)
    ({"counts": np.ones(T)}, r"counts: expected 2-D"),
    ({"counts": np.ones((2, 2, T, 3))}, r"counts: expected 2-D"),
    ({"counts": -np.ones((T, 3))}, r"counts: contains negative values"),
    ({"counts": np.full((T, 3), 0.5)}, r"counts: contains non-integer"),
    ({"counts": np.full((T, 3), np.nan)}, r"counts: contains NaN"),
    ({"counts": np.full((T, 3), np.inf)}, r"counts: contains inf"),
    ({"counts": np.zeros((T, 0))}, r"counts: every axis must be non-empty"),
    ({"velocity": np.ones((T - 1, 2))}, r"velocity: length 49 does not match counts length 50"),
    ({"velocity": np.ones(T)}, r"velocity: expected 2-D"),
    ({"velocity": np.full((T, 2), np.nan)}, r"velocity: contains NaN"),
    ({"velocity": np.full((T, 2), -np.inf)}, r"velocity: contains inf"),
    ({"position": np.ones((T + 1, 2))}, r"position: length 51 does not match counts length 50"),
    ({"position": np.full((T, 2), np.nan)}, r"position: contains NaN"),
    ({"timestamps": np.arange(T - 1.0)}, r"timestamps: length 49 does not match"),
    ({"timestamps": np.zeros(T)}, r"timestamps: must be strictly increasing"),
    ({"timestamps": np.full(T, np.nan)}, r"timestamps: contains NaN"),
    ({"bin_s": 0.0}, r"bin_s: must be > 0, got 0.0"),
    ({"bin_s": -0.02}, r"bin_s: must be > 0"),
    ({"bin_s": np.nan}, r"bin_s: must be finite"),
    ({"bin_s": np.inf}, r"bin_s: must be finite"),
    ({"site_xy": np.ones((3, 2))}, r"site_xy: expected shape \(1, 2\)"),
    ({"counts": np.ones((2, T, 3), int), "site_xy": None}, r"site_xy: required for 3-D"),
    ({"counts": np.ones((2, T, 3), int), "site_xy": np.ones((3, 2))}, r"site_xy: expected shape \(2, 2\)"),
    ({"counts": np.ones((2, T, 3), int), "site_xy": np.full((2, 2), np.nan)}, r"site_xy: contains NaN"),
    ({"date_days": np.nan}, r"date_days: must be finite"),
    ({"date_days": "3"}, r"date_days: must be a number"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_FIELDS)
def test_validate_session_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        validate_session(replace(make_session(T=T), **overrides))


@pytest.mark.parametrize(("overrides", "message"), [b for b in BAD_FIELDS if "every axis" not in b[1]])
def test_load_npz_names_the_field(tmp_path: Path, overrides: dict, message: str) -> None:
    s = make_session(T=T)
    fields = {
        "counts": s.counts,
        "bin_s": s.bin_s,
        "velocity": s.velocity,
        "position": s.position,
        "timestamps": s.timestamps,
        "date_days": s.date_days,
    }
    fields.update(overrides)
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in fields.items() if v is not None})
    with pytest.raises(ValueError, match="^" + message):
        load_npz(tmp_path / "bad.npz")


def test_validate_normalises_dtypes() -> None:
    s = replace(make_session(), counts=np.ones((50, 7), dtype=np.float64))
    v = validate_session(s)
    assert v.counts.dtype == np.int32 and v.velocity.dtype == np.float32
    assert v.timestamps.dtype == np.float64 and isinstance(v.bin_s, float)
    with pytest.raises(ValueError, match="^counts: must be a real numeric array"):
        validate_session(replace(s, counts=np.ones((50, 7), dtype=bool)))
    with pytest.raises(ValueError, match="^subject: must be a str"):
        validate_session(replace(s, subject=3))


# ------------------------------------------------------------------------------------ dispatch


def test_load_session_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"path: unknown suffix '\.csv'.*\.mat.*\.npz.*\.nwb"):
        load_session(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_session(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "missing.npz")


def test_session_files_lists_what_load_session_reads(tmp_path: Path) -> None:
    for name in ("b.npz", "a.npz", "c.mat", "d.nwb", "e.csv", "sub/f.npz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    assert [f.name for f in session_files(tmp_path)] == ["a.npz", "b.npz", "c.mat", "d.nwb"]
    assert session_files(tmp_path / "sub") == [tmp_path / "sub" / "f.npz"]
    assert session_files(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------ MAT


def test_mat_custom_layout_and_detection_error(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    spikes = rng.poisson(2.0, size=(5, 30)).astype(float)  # (C, T) channels-first
    vel = rng.normal(size=(3, 30))
    savemat(tmp_path / "odd.mat", {"S": spikes, "V": vel, "dt": np.array([[0.01]])})
    with pytest.raises(ValueError, match=r"layout: no known MAT layout.*StevensonV2.*contdata95"):
        load_mat(tmp_path / "odd.mat")
    layout = MatLayout(
        name="odd",
        counts_key="S",
        velocity_key="V",
        channels_first=True,
        velocity_dims=(0, 2),
        bin_s_key="dt",
    )
    s = load_mat(tmp_path / "odd.mat", layout=layout)
    assert s.counts.shape == (30, 5) and s.counts.dtype == np.int32 and s.bin_s == 0.01
    np.testing.assert_array_equal(s.counts, spikes.T)
    np.testing.assert_allclose(s.velocity, vel[[0, 2]].T, rtol=1e-6)
    bad = MatLayout(
        name="odd", counts_key="S", velocity_key="V", channels_first=True, velocity_dims=(5,), bin_s=0.01
    )
    with pytest.raises(ValueError, match="^velocity: layout 'odd' asks for dims"):
        load_mat(tmp_path / "odd.mat", layout=bad)
    with pytest.raises(ValueError, match="^layout: unknown layout 'nope'"):
        load_mat(tmp_path / "odd.mat", layout="nope")
    with pytest.raises(ValueError, match="^bin_s: layout"):
        MatLayout(name="x", counts_key="S")


@pytest.mark.realdata
def test_stevenson_mat_loads() -> None:
    if not STEVENSON.exists():
        pytest.skip(f"{STEVENSON} not available")
    s = load_session(STEVENSON)
    assert s.extra["mat_layout"] == "StevensonV2"
    assert s.counts.shape == (15536, 196) and s.counts.dtype == np.int32
    assert s.velocity.shape == (15536, 2) and s.position.shape == (15536, 2)
    assert s.timestamps.shape == (15536,) and s.timestamps[0] == pytest.approx(12.591)
    assert s.bin_s == pytest.approx(0.05)
    assert s.counts.min() >= 0 and s.counts.max() == 26
    assert 0.04 < s.velocity[:, 0].std() < 0.07  # m/s, as documented
    assert s.task == "center-out" and s.session == "StevensonV2"


@pytest.mark.realdata
def test_contdata95_mat_loads() -> None:
    if not CONTDATA.exists():
        pytest.skip(f"{CONTDATA} not available")
    s = load_mat(CONTDATA)
    assert s.extra["mat_layout"] == "contdata95"
    assert s.counts.shape == (31413, 95) and s.counts.dtype == np.int32
    assert s.velocity.shape == (31413, 2) and s.position.shape == (31413, 2)
    assert s.timestamps is None and s.bin_s == 0.05
    assert s.counts.max() == 21
    assert s.position.min() < -100 and s.position.max() > 90  # X columns 0:2 are position


def test_mat_layouts_cover_both_files() -> None:
    assert {"StevensonV2", "contdata95"} <= set(MAT_LAYOUTS)


# ------------------------------------------------------------------------------------ NWB


def _write_nwb(
    path: Path,
    *,
    spike_times: list[list[float]],
    beh_t: np.ndarray | None,
    beh: np.ndarray | None,
    in_acquisition: bool = False,
    name: str = "hand_velocity",
) -> None:
    pynwb = pytest.importorskip("pynwb")
    from pynwb.behavior import BehavioralTimeSeries
    from pynwb.file import Subject

    nwb = pynwb.NWBFile(
        session_description="synthetic",
        identifier="id-1",
        session_id="sess-7",
        session_start_time=datetime(2024, 3, 1, 12, tzinfo=timezone.utc),
        subject=Subject(subject_id="monkey-X"),
    )
    for st in spike_times:
        nwb.add_unit(spike_times=np.asarray(st, dtype=float))
    if beh is not None:
        ts = pynwb.TimeSeries(name=name, data=beh, unit="m/s", timestamps=beh_t)
        if in_acquisition:
            nwb.add_acquisition(ts)
        else:
            module = nwb.create_processing_module(name="behavior", description="behaviour")
            module.add(BehavioralTimeSeries(time_series=[ts], name="BehavioralTimeSeries"))
    with pynwb.NWBHDF5IO(str(path), mode="w") as io:
        io.write(nwb)


def test_nwb_bins_spikes_exactly(tmp_path: Path) -> None:
    beh_t = 0.5 + 0.01 * np.arange(101)  # 0.5 .. 1.5 s, 100 Hz
    beh = np.stack([beh_t, -2.0 * beh_t], axis=1)  # (101, 2) linear in time: interpolation is exact
    spikes = [
        [0.505, 0.515, 0.531, 1.21, 1.499],  # bins 0, 0, 1, 35, 49
        [0.1, 0.6001, 0.81, 0.815, 1.51],  # before start (dropped), 5, 15, 15, after end (dropped)
        [],
    ]
    path = tmp_path / "rec.nwb"
    _write_nwb(path, spike_times=spikes, beh_t=beh_t, beh=beh)
    s = load_session(path, bin_s=0.02)
    expected = np.zeros((50, 3), dtype=np.int32)
    for unit, bins in ((0, [0, 0, 1, 35, 49]), (1, [5, 15, 15])):
        for b in bins:
            expected[b, unit] += 1
    np.testing.assert_array_equal(s.counts, expected)
    np.testing.assert_allclose(s.timestamps, 0.5 + 0.02 * np.arange(50), atol=1e-12)
    centres = s.timestamps + 0.01
    np.testing.assert_allclose(s.velocity, np.stack([centres, -2 * centres], 1), atol=1e-5)
    assert (s.subject, s.session, s.bin_s) == ("monkey-X", "sess-7", 0.02)
    assert s.extra["session_start_time"].startswith("2024-03-01T12:00")


def test_nwb_acquisition_named_series_and_no_behaviour(tmp_path: Path) -> None:
    beh_t = np.linspace(0.0, 1.0, 11)
    path = tmp_path / "acq.nwb"
    _write_nwb(
        path, spike_times=[[0.05, 0.5]], beh_t=beh_t, beh=np.ones(11), in_acquisition=True, name="cursor"
    )
    s = load_nwb(path, bin_s=0.1)  # no name contains "vel": no velocity, span = spikes
    assert s.velocity is None and s.counts.shape == (5, 1) and s.counts.sum() == 2
    s = load_nwb(path, bin_s=0.1, velocity_series="cursor")
    assert s.counts.shape == (10, 1) and s.velocity.shape == (10, 1)
    np.testing.assert_allclose(s.velocity, 1.0)
    with pytest.raises(ValueError, match="^velocity_series: no series 'hand'.*cursor"):
        load_nwb(path, bin_s=0.1, velocity_series="hand")
    with pytest.raises(ValueError, match="^bin_s: must be > 0"):
        load_nwb(path, bin_s=0.0)
    # spike times need a bin width: one line naming it (`rpnt evaluate --data x.nwb` passes none)
    with pytest.raises(
        ValueError, match=r"^bin_s: the file holds spike times \(Units\), which need a bin width"
    ):
        load_session(path)


def test_nwb_missing_pynwb_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynwb", None)
    with pytest.raises(ImportError, match=r"pip install 'rpnt\[nwb\]'"):
        load_nwb(tmp_path / "x.nwb", bin_s=0.02)


def test_nwb_is_checked_before_any_dataset_is_read(tmp_path: Path) -> None:
    pytest.importorskip("pynwb")
    import h5py

    mb512 = 512 << 20
    bomb = crafted.hdf5_bomb(tmp_path / "bomb.nwb")  # a 16 GB dataset in a few KB
    assert bomb.stat().st_size < 100_000
    linked = tmp_path / "linked.nwb"
    with h5py.File(linked, "w") as f:
        f["units"] = h5py.ExternalLink(str(tmp_path / "elsewhere.h5"), "/")
    outside = tmp_path / "outside.nwb"
    with h5py.File(outside, "w") as f:  # raw data in another file of the reader's machine
        f.create_dataset(
            "units/spike_times", shape=(10,), dtype="f8", external=[(str(tmp_path / "raw.bin"), 0, 80)]
        )
    for path, message in (
        (bomb, "acquisition/bomb/data: declares 16 GB uncompressed, over the 512 MB limit"),
        (linked, "units: links to another file, which is not accepted"),
        (outside, "units/spike_times: stored outside the file, which is not accepted"),
    ):
        with pytest.raises(ValueError) as e:
            load_nwb(path, bin_s=0.02, max_bytes=mb512)
        assert str(e.value) == message, path.name


def test_nwb_binning_is_held_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "span.nwb"
    _write_nwb(path, spike_times=[[0.0, 1e7]], beh_t=None, beh=None)  # two spikes 116 days apart
    with pytest.raises(ValueError) as e:
        load_nwb(path, bin_s=0.02, max_bytes=512 << 20)
    assert str(e.value) == "units: 500000001 bins of 20 ms × 1 units come to 9.3 GB, over the 512 MB limit"


def test_a_well_formed_nwb_file_passes_the_checks(tmp_path: Path) -> None:
    beh_t = 0.01 * np.arange(101)
    path = tmp_path / "ok.nwb"
    _write_nwb(path, spike_times=[[0.1, 0.5], [0.7]], beh_t=beh_t, beh=np.stack([beh_t, beh_t**2], 1))
    limited, free = load_nwb(path, bin_s=0.02, max_bytes=1 << 20), load_nwb(path, bin_s=0.02)
    np.testing.assert_array_equal(limited.counts, free.counts)
    np.testing.assert_array_equal(limited.velocity, free.velocity)


# ------------------------------------------------------------------------------------ Miller lab binnedData

SPIKE_NEV = "Z:\\Spike_10I3\\CerebusData\\08-17-12\\Spike_08-17-12_WF_001.nev"


def write_binned(
    path: Path,
    *,
    T: int = 400,
    N: int = 6,
    bin_s: float = 0.05,
    force: bool = True,
    meta: bool | dict = True,
    seed: int = 0,
    **overrides,
) -> dict:
    """A binnedData MAT file as the Miller lab writes it (rates in Hz, float32 time frame)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.0, size=(T, N))
    vel = rng.normal(size=(T, 2))
    data = {
        "timeframe": (np.arange(T) * bin_s).astype(np.float32)[:, None],  # (T, 1)
        "spikeratedata": (counts / bin_s).astype(np.float32),  # Hz
        "spikeguide": np.array([f"ee{i + 1:02d}u0" for i in range(N)]),
        "cursorposbin": rng.normal(size=(T, 2)).astype(np.float32),
        "velocbin": np.concatenate([vel, np.linalg.norm(vel, axis=1, keepdims=True)], axis=1).astype(
            np.float32
        ),
        "forcedatabin": rng.normal(size=(T, 2)).astype(np.float32) if force else np.zeros((0, 0)),
        "emgdatabin": rng.random((T, 3)).astype(np.float32),
        "trialtable": rng.random((5, 10)),
    }
    if meta:
        data["meta"] = (
            meta if isinstance(meta, dict) else {"datetime": "8/17/2012 15:8:46.503", "filename": SPIKE_NEV}
        )
    data.update(overrides)
    savemat(path, {"binnedData": data})
    return {"counts": counts, **data}


def test_binned_data_loads_counts_targets_and_metadata(tmp_path: Path) -> None:
    raw = write_binned(tmp_path / "renamed.mat")
    s = load_session(tmp_path / "renamed.mat")
    assert s.extra["mat_layout"] == "binnedData"
    assert s.counts.dtype == np.int32 and s.counts.shape == (400, 6)
    np.testing.assert_array_equal(s.counts, raw["counts"])  # Hz × 50 ms, exact
    assert s.bin_s == 0.05  # from the float32 time frame, exactly
    np.testing.assert_allclose(s.velocity, raw["velocbin"][:, :2])  # the 3rd column (speed) is dropped
    np.testing.assert_allclose(s.position, raw["cursorposbin"])
    assert set(s.targets) == {"velocity", "position", "force", "emg"} and s.targets["emg"].shape == (400, 3)
    assert s.target == "velocity" and s.n_outputs == 2
    # names from the file's meta (the original recording), not the MAT file's name
    assert (s.session, s.subject, s.task) == ("Spike_08-17-12_WF_001", "Spike", "WF")
    assert s.extra["session_start_time"] == "2012-08-17T15:08:46.503000"
    assert s.date_days == pytest.approx(
        (datetime(2012, 8, 17, 15, 8, 46, 503000) - datetime(1970, 1, 1)).total_seconds() / 86400
    )
    assert list(s.extra["channel_names"]) == [f"ee{i + 1:02d}u0" for i in range(6)]
    assert s.extra["trials"].shape == (5, 10)
    assert s.timestamps.shape == (400,) and s.timestamps[1] == pytest.approx(0.05)


def test_binned_data_without_force_or_meta(tmp_path: Path) -> None:
    write_binned(tmp_path / "Nick_CO_001-01-binned.mat", force=False, meta=False)
    s = load_mat(tmp_path / "Nick_CO_001-01-binned.mat")
    assert set(s.targets) == {"velocity", "position", "emg"}  # empty forcedatabin = not recorded
    assert (s.session, s.subject, s.task, s.date_days) == ("Nick_CO_001-01-binned", "", "", 0.0)
    with pytest.raises(
        ValueError,
        match=r"^target: Nick_CO_001-01-binned has no 'force' \(it has velocity, "
        r"position, emg\)$",
    ):
        s.with_target("force")


def test_binned_data_task_from_the_file_name_when_the_recording_name_lacks_it(tmp_path: Path) -> None:
    write_binned(
        tmp_path / "Spike_07-21-12_WF_001.mat",
        meta={"datetime": "7/21/2012 17:7:46.714", "filename": "C:\\data\\Spike_07-21-12_001.nev"},
    )
    s = load_mat(tmp_path / "Spike_07-21-12_WF_001.mat")
    assert (s.session, s.subject, s.task) == ("Spike_07-21-12_001", "Spike", "WF")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            {"spikeratedata": np.full((400, 6), 13.0, np.float32)},
            r"^spikeratedata: rate × bin width \(50 ms\) is not a whole spike count \(off by up to 0\.35\): "
            r"these are smoothed rates",
        ),
        (
            {
                "timeframe": np.r_[np.arange(200) * 0.05, 10.05 + np.arange(200) * 0.05].astype(np.float32)[
                    :, None
                ]
            },
            r"^timeframe: bins are not uniform \(steps from 50 ms to 100 ms\)",
        ),
        (
            {"meta": {"datetime": "yesterday", "filename": "x.nev"}},
            r"^meta\.datetime: 'yesterday' is not a date in the format",
        ),
    ],
)
def test_binned_data_refuses_what_it_cannot_trust(tmp_path: Path, overrides: dict, message: str) -> None:
    write_binned(tmp_path / "b.mat", **overrides)
    with pytest.raises(ValueError, match=message):
        load_mat(tmp_path / "b.mat")


def test_binned_data_missing_fields_name_what_was_found(tmp_path: Path) -> None:
    from scipy.io import savemat

    savemat(
        tmp_path / "half.mat", {"binnedData": {"spikeratedata": np.ones((4, 2)), "timeframe": np.arange(4.0)}}
    )
    with pytest.raises(
        ValueError,
        match=r"^layout: the struct binnedData in half\.mat lacks fields "
        r"\['cursorposbin', 'velocbin'\] that layout 'binnedData' needs "
        r"\(it has \['spikeratedata', 'timeframe'\]\)$",
    ):
        load_mat(tmp_path / "half.mat")


def test_s1_layout(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    spikes = rng.poisson(0.5, size=(300, 5)).astype(np.uint8)
    savemat(
        tmp_path / "s1_data.mat",
        {"spikes": spikes, "pos": rng.normal(size=(300, 2)), "vel": rng.normal(size=(300, 2))},
    )
    s = load_session(tmp_path / "s1_data.mat")
    assert s.extra["mat_layout"] == "miller_area2_s1" and s.bin_s == 0.05
    np.testing.assert_array_equal(s.counts, spikes)
    assert set(s.targets) == {"velocity", "position"}


def test_unreadable_or_unknown_mat_files_get_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.mat").write_bytes(b"not a MAT file at all " * 20)
    with pytest.raises(ValueError, match=r"^path: junk\.mat is not a readable MAT v5 file \(") as e:
        load_session(tmp_path / "junk.mat")
    assert "\n" not in str(e.value)
    from scipy.io import savemat

    savemat(tmp_path / "odd.mat", {"rates": np.ones((3, 4)), "info": {"who": "me"}})
    with pytest.raises(
        ValueError,
        match=r"^layout: no known MAT layout matches odd\.mat, which holds "
        r"info 1×1 struct, rates 3×4 double; known layouts: StevensonV2 ",
    ) as e:
        load_session(tmp_path / "odd.mat")
    assert "\n" not in str(e.value) and str(tmp_path) not in str(e.value)


@pytest.mark.realdata
def test_s1_and_nick_mat_load() -> None:
    s1 = SHARED_DATA / "miller_area2_s1" / "s1_data.mat"
    nick = SHARED_DATA / "limblab_nick_co" / "Nick_CO_001-01-binned.mat"
    if not (s1.exists() and nick.exists()):
        pytest.skip("miller_area2_s1 / limblab_nick_co not available")
    s = load_session(s1)
    assert s.counts.shape == (35129, 52) and s.bin_s == 0.05 and s.counts.max() == 15
    n = load_session(nick)
    assert n.counts.shape == (11880, 97) and n.bin_s == 0.05 and set(n.targets) == {"velocity", "position"}
    assert n.extra["channel_names"][0] == "ee01u1"  # sorted units


def test_binned_data_that_is_not_one_struct(tmp_path: Path) -> None:
    from scipy.io import savemat

    savemat(tmp_path / "arr.mat", {"binnedData": np.ones((3, 2))})
    with pytest.raises(
        ValueError,
        match=r"^layout: binnedData 3×2 double in arr\.mat is not the single struct "
        r"that layout 'binnedData' reads$",
    ):
        load_mat(tmp_path / "arr.mat")
    savemat(tmp_path / "many.mat", {f"v{i:02d}": np.ones(2) for i in range(15)})
    with pytest.raises(ValueError, match=r"which holds v00 1×2 double, .*, v11 1×2 double and 3 more; known"):
        load_mat(tmp_path / "many.mat")


def test_npz_round_trips_every_behaviour_series_and_the_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    T = 50
    s = Session(
        counts=rng.poisson(1.0, size=(T, 4)).astype(np.int32),
        bin_s=0.05,
        velocity=rng.normal(size=(T, 2)).astype(np.float32),
        position=rng.normal(size=(T, 2)).astype(np.float32),
        behaviour={
            "force": rng.normal(size=(T, 2)).astype(np.float32),
            "emg": rng.random((T, 3)).astype(np.float32),
        },
        target="force",
    )
    back = load_session(save_npz(s, tmp_path / "s.npz"))
    assert back.target == "force" and set(back.targets) == {"velocity", "position", "force", "emg"}
    for name, series in s.targets.items():
        np.testing.assert_array_equal(back.targets[name], series)
    np.testing.assert_array_equal(back.labels, s.behaviour["force"])
    assert back.fingerprint() == s.fingerprint()
