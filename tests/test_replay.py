"""``rpnt replay``: a recorded session as events through the daemon; the predictions that come back
over the sockets equal offline ``rpnt evaluate`` (torch, streamed from bin 0); the report (JSON +
PNG); in-process, child-process and connect-to-a-running-daemon modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_streaming_support import BIN_NS, FIRDecoder, offline, short_ipc_dir, tiny_export

from streaming.daemon import Daemon
from streaming.options import DaemonOptions
from streaming.replay import run_replay

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def torch_reference(tiny):
    """What `rpnt evaluate` streams for the session: the torch model, causally from bin 0."""
    from rpnt_core.checkpoint import load_checkpoint
    from rpnt_core.data.formats import load_session
    from rpnt_core.evaluate.harness import predict_session

    return predict_session(load_checkpoint(tiny["ckpt"]), load_session(tiny["npz"]))


def _daemon(decoder, **opt):
    tmp = short_ipc_dir()
    return Daemon(
        decoder=decoder,
        bin_s=0.02,
        ingest=f"ipc://{tmp}/i",
        publish=f"ipc://{tmp}/o",
        options=DaemonOptions(**opt),
    ).start()


def test_replayed_predictions_equal_offline_evaluate_and_counts_are_rebuilt_exactly(tiny, torch_reference):
    from exporters.runtime import load_engine

    d = _daemon(load_engine(tiny["export"]), history_s=60.0)
    try:
        res = run_replay(
            counts=tiny["counts"],
            labels={"velocity": tiny["velocity"]},
            bin_ns=BIN_NS,
            ingest=d.endpoints["ingest"],
            publish=d.endpoints["publish"],
            realtime=False,
        )
        counts_back, vel_back = d.recent_training_data(60.0)
    finally:
        d.stop()
        d.join(30)
    assert res.bins_lost == 0 and res.received.all()
    # ONNX Runtime through the sockets vs torch offline, to float tolerance
    np.testing.assert_allclose(res.velocity, torch_reference, rtol=0, atol=1e-4)
    # the daemon rebuilt the recorded counts exactly, bin by bin, and paired them with the kinematics
    np.testing.assert_array_equal(res.n_spikes, tiny["counts"].sum(1))
    np.testing.assert_array_equal(counts_back, tiny["counts"])
    np.testing.assert_array_equal(vel_back, tiny["velocity"])
    assert res.model_versions == [tiny["meta"]["weights_sha"]]
    assert res.flags[0] == 8 and not res.flags[1:].any()  # FIRST, then nothing to report


def test_rpnt_replay_report_matches_rpnt_evaluate(tiny, torch_reference, tmp_path, capsys):
    from rpnt_core.commands import evaluate_main
    from rpnt_core.evaluate.metrics import r2_score
    from streaming.cli import replay_main

    out = tmp_path / "report"
    assert (
        replay_main(
            ["--data", str(tiny["npz"]), "--model", str(tiny["export"]), "--report", str(out), "--json"]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["bins"] == rep["bins_received"] == 400 and rep["bins_lost"] == 0
    assert rep["score"]["r2"] == pytest.approx(r2_score(tiny["velocity"], torch_reference), abs=1e-4)
    for stage in (
        "ingest",
        "parse",
        "infer",
        "publish",
        "deliver",
        "daemon",
        "daemon_overhead",
        "end_to_end",
    ):
        s = rep["latency_ms"][stage]
        assert s["count"] == 400 and s["p50_ms"] <= s["p99_ms"] <= s["p99.9_ms"] <= s["max_ms"]
    assert rep["daemon_snapshot"]["counters"]["bins"] == 400
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["score"] == rep["score"] and on_disk["files"]["velocity_png"] == "velocity.png"
    for name in ("velocity.png", "latency.png"):
        assert (out / name).read_bytes()[:8] == PNG
    arrays = np.load(out / "predictions.npz")
    np.testing.assert_allclose(arrays["velocity"], torch_reference, atol=1e-4)
    # `rpnt evaluate` on the same checkpoint and session: the same test-split R²
    assert evaluate_main(["--ckpt", str(tiny["ckpt"]), "--data", str(tiny["npz"]), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert tuple(ev["splits"]["test"]) == tuple(rep["score_test"]["bins"])
    assert rep["score_test"]["r2"] == pytest.approx(ev["r2"], abs=1e-4)


def test_replay_connects_to_a_running_daemon_and_checks_it_matches(tiny, capsys):
    from streaming.cli import replay_main

    d = _daemon(FIRDecoder(), stall_timeout_s=10.0)
    try:
        ep = ["--ingest", d.endpoints["ingest"], "--publish", d.endpoints["publish"]]
        assert replay_main(["--data", str(tiny["npz"]), "--connect", *ep, "--stop", "100", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert (
            rep["bins_lost"] == 0 and rep["model_versions"] == ["fir-a"] and rep["daemon_mode"] == "connect"
        )
        # a second replay on the same daemon starts its own stream (RESET) and decodes it from scratch
        assert (
            replay_main(
                [
                    "--data",
                    str(tiny["npz"]),
                    "--connect",
                    *ep,
                    "--start",
                    "100",
                    "--stop",
                    "150",
                    "--realtime",
                    "--json",
                ]
            )
            == 0
        )
        rep2 = json.loads(capsys.readouterr().out)
        assert rep2["bins_lost"] == 0 and rep2["pace"] == "realtime"
        assert replay_main(["--data", str(tiny["npz"]), "--connect", *ep, "--bin-ms", "50"]) == 1
        err = capsys.readouterr().err
        assert "the daemon bins at 20 ms, this replay at 50 ms" in err and " ns" not in err, err
        assert "--bin-ms 20" in err  # what to do about it
        assert d.status()["epoch"] == 2
    finally:
        d.stop()
        d.join(30)


def test_realtime_replay_equals_offline(tiny):
    d = _daemon(FIRDecoder(), stall_timeout_s=10.0)  # a busy machine must not turn into stalled bins
    try:
        counts = tiny["counts"][:30]
        res = run_replay(
            counts=counts,
            bin_ns=BIN_NS,
            ingest=d.endpoints["ingest"],
            publish=d.endpoints["publish"],
            realtime=True,
            labels={"velocity": tiny["velocity"][:30]},
        )
    finally:
        d.stop()
        d.join(30)
    assert res.pace == "realtime" and res.bins_lost == 0
    np.testing.assert_array_equal(res.velocity, offline(FIRDecoder(), counts))
    assert (res.t_client_recv > res.t_send).all()
    assert res.wall_s >= 30 * 0.02 * 0.9  # paced: the replay took (about) as long as the recording


def test_replay_with_a_child_process_daemon(tiny, tmp_path, capsys):
    from streaming.cli import replay_main

    out = tmp_path / "rt"
    assert (
        replay_main(
            [
                "--data",
                str(tiny["npz"]),
                "--model",
                str(tiny["export"]),
                "--daemon",
                "process",
                "--realtime",
                "--stop",
                "25",
                "--stall-ms",
                "5000",
                "--report",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "25 predictions, 0 lost" in text and "end_to_end" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["daemon_mode"] == "process" and rep["daemon"]["n_channels"] == 8


def test_replay_connect_says_what_it_waits_for_and_gives_up_at_the_timeout(tiny, capsys):
    """No daemon at the endpoints: before waiting, one line names both endpoints and the bound;
    at the bound, exit 1 with the reason (no silent 30-s wait)."""
    from streaming.cli import replay_main

    tmp = short_ipc_dir()
    ingest, publish = f"ipc://{tmp}/nobody-in", f"ipc://{tmp}/nobody-out"
    assert (
        replay_main(
            [
                "--data",
                str(tiny["npz"]),
                "--connect",
                "--ingest",
                ingest,
                "--publish",
                publish,
                "--timeout",
                "0.5",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.splitlines()
    waiting = [ln for ln in err if ln.startswith("rpnt replay: waiting")]
    assert len(waiting) == 1 and ingest in waiting[0] and publish in waiting[0] and "0.5 s" in waiting[0], err
    assert err.index(waiting[0]) < len(err) - 1
    assert err[-1].startswith("rpnt replay: FAILED: no PONG from the daemon within 0.5 s"), err
    assert (
        replay_main(
            [
                "--data",
                str(tiny["npz"]),
                "--connect",
                "--ingest",
                ingest,
                "--publish",
                publish,
                "--timeout",
                "0",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err == "rpnt replay: error: --timeout: must be > 0 seconds, got 0\n"


def test_replay_usage_errors(tiny, capsys):
    from streaming.cli import replay_main

    assert replay_main(["--data", str(tiny["npz"]) + ".missing", "--model", str(tiny["export"])]) == 2
    assert replay_main(["--data", str(tiny["npz"]), "--connect"]) == 2
    assert replay_main(["--data", str(tiny["npz"]), "--model", str(tiny["export"]), "--start", "500"]) == 2
    err = capsys.readouterr().err
    assert "needs --ingest" in err and "empty bin range" in err


def test_replay_scores_and_streams_the_series_the_daemons_model_decodes(tiny):
    """A position decoder is scored against position and fed position as KINEMATICS (never velocity);
    a recording without the model's target says so instead of scoring something else."""
    from dataclasses import replace

    from test_streaming_support import FIRDecoder

    dec = FIRDecoder(n_channels=tiny["counts"].shape[1])
    dec._info = replace(dec.info, extra={**dec.info.extra, "target": "position"})
    T = 60
    counts, vel = tiny["counts"][:T], tiny["velocity"][:T]
    pos = np.cumsum(vel, axis=0).astype(np.float32)
    d = _daemon(dec, history_s=60.0)
    try:
        res = run_replay(
            counts=counts,
            labels={"velocity": vel, "position": pos},
            bin_ns=BIN_NS,
            ingest=d.endpoints["ingest"],
            publish=d.endpoints["publish"],
            realtime=False,
        )
        _, kin_back = d.recent_training_data(60.0)
        missing = run_replay(
            counts=counts,
            labels={"velocity": vel},
            bin_ns=BIN_NS,
            ingest=d.endpoints["ingest"],
            publish=d.endpoints["publish"],
            realtime=False,
        )
    finally:
        d.stop()
        d.join(30)
    assert res.status["target"] == "position" and res.target == "position"
    np.testing.assert_array_equal(res.recorded, pos)
    np.testing.assert_array_equal(kin_back[-T:], pos)
    assert missing.recorded is None and any("does not have" in n for n in missing.notes), missing.notes
