"""NWB out: ``rpnt replay --nwb`` and ``rpnt serve``'s session recording write the decoded session
as NWB (binned counts, recorded behaviour, decoded target, flags, per-stage latencies, model
version); the file passes pynwb's validator and the NWB Inspector, and reads back exactly through
``rpnt_core.data.load_nwb`` and ``rpnt evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pynwb = pytest.importorskip("pynwb")
nwbinspector = pytest.importorskip("nwbinspector")

from test_streaming_support import BIN_NS, FIRDecoder, short_ipc_dir, tiny_export  # noqa: E402

REPLAY_STAGES = ("ingest", "parse", "infer", "publish", "deliver", "daemon", "daemon_overhead", "end_to_end")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def replayed(tiny, tmp_path_factory):
    """`rpnt replay --nwb --report` of the tiny session: (nwb path, report dir, report JSON)."""
    from streaming.cli import replay_main

    out = tmp_path_factory.mktemp("nwb-replay")
    nwb, report = out / "decoded.nwb", out / "report"
    assert (
        replay_main(
            [
                "--data",
                str(tiny["npz"]),
                "--model",
                str(tiny["export"]),
                "--nwb",
                str(nwb),
                "--report",
                str(report),
                "--json",
                "--log-level",
                "error",
            ]
        )
        == 0
    )
    return nwb, report, json.loads((report / "report.json").read_text())


#: what the NWB Inspector still asks for: metadata only the lab knows (who, where, which animal)
LAB_METADATA_CHECKS = {"check_experimenter_exists", "check_institution", "check_subject_exists"}


def assert_valid_nwb(path: Path) -> None:
    """pynwb's schema validator, and every NWB Inspector check (down to best-practice suggestions)
    but the lab's own metadata."""
    errors = pynwb.validate(path=str(path))
    assert errors == [], errors
    messages = [m for m in nwbinspector.inspect_nwbfile(nwbfile_path=str(path)) if m is not None]
    other = [
        f"{m.check_function_name}: {m.message}"
        for m in messages
        if m.check_function_name not in LAB_METADATA_CHECKS
    ]
    assert other == []


def _read(path: Path) -> dict:
    """Everything rpnt wrote, read with pynwb itself (not through rpnt's loader)."""
    with pynwb.NWBHDF5IO(str(path), mode="r") as io:
        f = io.read()
        misc = f.processing["misc"]
        bins = misc["decoder_bins"]
        decoded = {
            n: (np.asarray(o.data[:]), o.comments)
            for n, o in misc.data_interfaces.items()
            if isinstance(o, pynwb.TimeSeries)
        }
        return {
            "counts": np.asarray(f.processing["ecephys"]["binned_counts"].data[:]),
            "rate": f.processing["ecephys"]["binned_counts"].rate,
            "behavior": {
                n: np.asarray(o.data[:]) for n, o in f.processing["behavior"].data_interfaces.items()
            }
            if "behavior" in f.processing
            else {},
            "decoded": decoded,
            "bins": {c: np.asarray(bins[c].data[:]) for c in bins.colnames},
            "notes": f.notes,
            "module_description": misc.description,
        }


def test_replay_nwb_validates_and_holds_what_the_replay_decoded(tiny, replayed):
    nwb, report, rep = replayed
    assert_valid_nwb(nwb)
    arrays = np.load(report / "predictions.npz")
    got = _read(nwb)
    assert got["rate"] == pytest.approx(1e9 / BIN_NS)
    np.testing.assert_array_equal(got["counts"], tiny["counts"])
    # the decoded target under its own name, with its dims; equal to the replay's own output, bit for bit
    ((name, (decoded, comments)),) = got["decoded"].items()
    assert name == rep["target"] == "velocity" and "dims=2" in comments
    assert decoded.dtype == np.float32 and decoded.shape == (400, 2)
    np.testing.assert_array_equal(decoded, arrays["velocity"])
    np.testing.assert_array_equal(got["behavior"]["velocity"], tiny["velocity"])
    b = got["bins"]
    np.testing.assert_array_equal(b["flags"], arrays["flags"])
    np.testing.assert_array_equal(b["received"], arrays["received"])
    np.testing.assert_array_equal(b["n_spikes"], arrays["n_spikes"])
    np.testing.assert_array_equal(b["bin"], np.arange(400))
    # per-stage latencies per bin: the report's percentiles come from exactly these values
    for stage in REPLAY_STAGES:
        col = b[f"{stage}_ns"]
        timed = col[col >= 0]
        assert timed.size == rep["latency_ms"][stage]["count"] == 400
        assert timed.max() / 1e6 == pytest.approx(rep["latency_ms"][stage]["max_ms"])
    np.testing.assert_array_equal(b["infer_ns"], arrays["t_daemon"][:, 2] - arrays["t_daemon"][:, 1])
    version = tiny["meta"]["weights_sha"]
    assert set(b["generation"]) == {1} and set(b["model_version"]) == {version}
    assert version in got["module_description"] and version in got["notes"]


def test_replay_nwb_reads_back_exactly_through_the_loader_and_rpnt_evaluate(tiny, replayed, capsys):
    from rpnt_core.commands import evaluate_main
    from rpnt_core.data import load_npz, load_session

    nwb, _, _ = replayed
    s = load_session(nwb)
    orig = load_npz(tiny["npz"])
    assert s.bin_s == orig.bin_s == 0.02
    np.testing.assert_array_equal(s.counts, orig.counts)
    np.testing.assert_array_equal(s.velocity, orig.velocity)
    # rpnt evaluate scores the NWB file exactly as it scores the session it was replayed from
    scores = []
    for data in (tiny["npz"], nwb):
        assert evaluate_main(["--ckpt", str(tiny["ckpt"]), "--data", str(data), "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["r2"] == scores[1]["r2"] and scores[0]["r2_per_dim"] == scores[1]["r2_per_dim"]


def test_a_replayed_nwb_replays_again_to_the_same_predictions(tiny, replayed, tmp_path):
    """The output is an input: replaying the NWB file gives the same predictions, bit for bit."""
    from streaming.cli import replay_main

    nwb, report, _ = replayed
    again = tmp_path / "again.nwb"
    assert (
        replay_main(
            ["--data", str(nwb), "--model", str(tiny["export"]), "--nwb", str(again), "--log-level", "error"]
        )
        == 0
    )
    first, second = _read(nwb), _read(again)
    np.testing.assert_array_equal(second["counts"], first["counts"])
    np.testing.assert_array_equal(second["decoded"]["velocity"][0], first["decoded"]["velocity"][0])
    np.testing.assert_array_equal(second["behavior"]["velocity"], first["behavior"]["velocity"])


def test_replay_nwb_usage_errors_exit_2_before_replaying(tiny, tmp_path, capsys):
    from streaming.cli import replay_main

    for path, says in (
        (tmp_path / "missing" / "x.nwb", "--nwb: no such directory"),
        (tmp_path / "x.h5", "--nwb: expected a file name ending in .nwb"),
    ):
        assert (
            replay_main(["--data", str(tiny["npz"]), "--model", str(tiny["export"]), "--nwb", str(path)]) == 2
        )
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_loader_refuses_a_bin_width_the_binned_file_does_not_have(replayed):
    from rpnt_core.data.nwb import load_nwb

    nwb, _, _ = replayed
    assert load_nwb(nwb, bin_s=0.02).n_bins == 400
    with pytest.raises(ValueError, match=r"^bin_s: the file holds counts binned at 20 ms, not 50 ms"):
        load_nwb(nwb, bin_s=0.05)


# ============================================================================ the daemon's session recording
def test_rpnt_serve_records_the_session_to_nwb_at_stop(tiny, tmp_path):
    """`rpnt serve --record-nwb` (a child process, real sockets), fed by a replay: at SIGTERM the
    file holds exactly the counts the rig sent, the predictions the replay received, the rig's
    kinematics and the model version; it validates and loads back."""
    from test_serve_startup import Serve

    from rpnt_core.data import load_session
    from streaming.replay import run_replay

    out = tmp_path / "session.nwb"
    d = short_ipc_dir()
    ingest, publish = f"ipc://{d}/in", f"ipc://{d}/out"
    srv = Serve(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(tmp_path / "registry"),
        "--no-http",
        "--record-nwb",
        str(out),
        "--ingest",
        ingest,
        "--publish",
        publish,
    )
    try:
        srv.wait_for("rpnt serve: ready")
        res = run_replay(
            counts=tiny["counts"],
            labels={"velocity": tiny["velocity"]},
            bin_ns=BIN_NS,
            ingest=ingest,
            publish=publish,
            realtime=False,
        )
        assert not out.exists()  # written at stop
    finally:
        rc = srv.stop()
    lines = [ln for ln in srv.lines if ln is not None]
    assert rc == 0, "\n".join(lines)
    assert lines[-1] == f"rpnt serve: recording: 400 bins written to {out}", lines
    assert res.received.all()
    assert_valid_nwb(out)
    got = _read(out)
    np.testing.assert_array_equal(got["counts"], tiny["counts"])
    np.testing.assert_array_equal(got["decoded"]["velocity"][0], res.velocity)
    np.testing.assert_array_equal(got["behavior"]["velocity"], tiny["velocity"])
    b = got["bins"]
    np.testing.assert_array_equal(b["flags"], res.flags)
    np.testing.assert_array_equal(b["bin"], np.arange(400))
    assert set(b["model_version"]) == {tiny["meta"]["weights_sha"]} and set(b["epoch"]) == {res.epoch}
    for stage in ("parse", "infer", "publish", "daemon"):
        assert (b[f"{stage}_ns"] >= 0).all()
    np.testing.assert_array_equal(b["daemon_ns"], b["parse_ns"] + b["infer_ns"] + b["publish_ns"])
    s = load_session(out)
    np.testing.assert_array_equal(s.counts, tiny["counts"])
    np.testing.assert_array_equal(s.velocity, tiny["velocity"])


def test_record_nwb_that_cannot_be_written_exits_2_before_start(tiny, tmp_path):
    from test_serve_startup import _fails

    d = short_ipc_dir()
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(tmp_path / "registry"),
        "--no-http",
        "--record-nwb",
        str(tmp_path / "nope" / "s.nwb"),
        "--ingest",
        f"ipc://{d}/in",
        "--publish",
        f"ipc://{d}/out",
    )
    assert line == f"rpnt serve: error: daemon.record_nwb: no such directory: {tmp_path / 'nope'}"
    assert not (tmp_path / "registry").exists()


def test_recording_follows_swaps_leaves_out_gappy_kinematics_and_stops_at_its_limit(tmp_path):
    """In-process daemon: a decoder swap shows in the generation / model_version columns; kinematics
    for only some bins are not written as a label; bins past record_s are counted, not kept."""
    from test_streaming_support import barrier, live_daemon, send_stream

    from rpnt_core.data import load_session
    from streaming.nwb_out import write_nwb

    rng = np.random.default_rng(3)
    counts = rng.poisson(1.0, size=(60, 8))
    a, b = FIRDecoder(version="fir-a"), FIRDecoder(version="fir-b", seed=1)
    with live_daemon(a, record_s=50 * 0.02, warmup_bins=0) as (d, rig, sub):
        send_stream(rig, counts[:20], kinematics=np.ones((20, 2), np.float32))
        barrier(rig, sub)
        d.swap_decoder(b)
        send_stream(rig, counts[20:], first_bin=20, reset=False)
        barrier(rig, sub)
    ds = d.recording()
    assert ds.n_bins == 50 and d.bins_not_recorded == 10
    np.testing.assert_array_equal(ds.counts, counts[:50])
    assert ds.model_versions == {1: "fir-a", 2: "fir-b"}
    first_b = int(np.flatnonzero(ds.generation == 2)[0])
    assert (ds.generation[:first_b] == 1).all() and (ds.generation[first_b:] == 2).all()
    assert ds.flags[first_b] & 16  # SWAPPED
    assert ds.labels == {}  # kinematics for 20 of 50 bins: no label series
    path = write_nwb(tmp_path / "rec.nwb", ds)
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left beside it
    assert_valid_nwb(path)
    got = _read(path)
    assert list(got["bins"]["model_version"][[0, first_b]]) == ["fir-a", "fir-b"]
    assert got["behavior"] == {} and load_session(path).velocity is None


def test_the_daemon_does_not_import_pynwb_unless_it_writes(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys; from streaming.daemon import Daemon, DaemonOptions; import streaming.recording, "
        "streaming.nwb_out, streaming.cli, service.cli; print('pynwb' in sys.modules, 'h5py' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """Atomic: the file at the path is the old one or the new one, never half of one."""
    from streaming.nwb_out import write_nwb

    T = 5
    ds = _small_session(T)
    path = write_nwb(tmp_path / "s.nwb", ds)
    before = path.read_bytes()

    def broken_write(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pynwb.NWBHDF5IO, "write", broken_write)
    with pytest.raises(OSError, match="No space left"):
        write_nwb(path, ds)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def _small_session(T: int):
    from streaming.nwb_out import DecodedSession

    rng = np.random.default_rng(0)
    return DecodedSession(
        bin_ns=BIN_NS,
        target="position",
        counts=rng.poisson(1.0, (T, 3)),
        decoded=rng.standard_normal((T, 2)).astype(np.float32),
        received=np.ones(T, bool),
        flags=np.zeros(T, np.int64),
        n_spikes=np.zeros(T, np.int64),
        epoch=np.ones(T, np.int64),
        bin=np.arange(T),
        generation=np.ones(T, np.int64),
        model_versions={1: "v1"},
        labels={"position": rng.standard_normal((T, 2)).astype(np.float32)},
    )


def test_the_decoded_series_is_named_by_the_target_and_position_labels_load_as_position(tmp_path):
    from rpnt_core.data import load_session
    from streaming.nwb_out import write_nwb

    ds = _small_session(7)
    path = write_nwb(tmp_path / "p.nwb", ds)
    assert_valid_nwb(path)
    got = _read(path)
    assert list(got["decoded"]) == ["position"] and "dims=2" in got["decoded"]["position"][1]
    s = load_session(path).with_target("position")
    np.testing.assert_array_equal(s.position, ds.labels["position"])
    np.testing.assert_array_equal(s.counts, ds.counts)
    assert s.velocity is None
