"""The daemon on the real ONNX path: an RPNT exported with the exporters package, run by ONNX Runtime;
the start-up path imports no torch; ``rpnt serve`` as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_streaming_support import (
    BIN_NS,
    LIVE_TIMEOUT,
    collect,
    live_daemon,
    send_stream,
    short_ipc_dir,
    tiny_export,
)

from streaming.client import PredictionSubscriber, RigClient, wait_for_daemon

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_daemon_start_up_path_does_not_import_torch(tiny):
    tmp = short_ipc_dir()
    code = textwrap.dedent(f"""
        import sys, json
        import streaming.daemon, streaming.cli, streaming.client, streaming.protocol, streaming.launch
        from streaming.launch import load_decoder
        from streaming.daemon import Daemon
        dec = load_decoder({str(tiny["export"])!r})
        d = Daemon(decoder=dec, bin_s=0.02, ingest="ipc://{tmp}/i", publish="ipc://{tmp}/o").start()
        d.stop(); d.join(30)
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                          "ort": "onnxruntime" in sys.modules}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=LIVE_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"torch": [], "ort": True}


def test_onnx_engine_in_the_daemon_equals_the_engine_offline(tiny):
    from exporters.runtime import load_engine
    from rpnt_core.decoder import decode_stream

    counts = np.random.default_rng(3).poisson(2.0, (150, 8))
    engine = load_engine(tiny["export"])
    assert type(engine).__name__ == "OnnxStepEngine"
    with live_daemon(engine) as (d, rig, sub):
        send_stream(rig, counts)
        preds = collect(sub, 150)
    ref = decode_stream(load_engine(tiny["export"]), counts)
    assert [p.bin for p in preds] == list(range(150))
    np.testing.assert_allclose(np.stack([p.velocity for p in preds]), ref, rtol=0, atol=1e-6)
    assert preds[0].model_version == tiny["meta"]["weights_sha"]  # the export's identity travels


def test_swap_between_two_onnx_engines_warm(tiny):
    """A warm swap of real engines: from the boundary on, the new engine says what it would have said
    had it decoded the stream from the start (its receptive field is within the history)."""
    from exporters.runtime import load_engine
    from rpnt_core.decoder import decode_stream

    counts = np.random.default_rng(4).poisson(2.0, (60, 8))
    a, b = load_engine(tiny["export"]), load_engine(tiny["export"], precision="fp32", name="second")
    with live_daemon(a) as (d, rig, sub):
        send_stream(rig, counts[:30])
        first = collect(sub, 30)
        ticket = d.swap_decoder(b)
        from streaming.replay import events_from_counts

        chans, times = events_from_counts(counts, BIN_NS)
        for k in range(30, 60):
            rig.send_spikes(chans[k], times[k], clock=(k + 1) * BIN_NS)
        second = collect(sub, 30)
        assert ticket.wait(LIVE_TIMEOUT) == 30
    vel = np.stack([p.velocity for p in first + second])
    np.testing.assert_allclose(vel, decode_stream(load_engine(tiny["export"]), counts), atol=1e-5)
    assert second[0].generation == 2


def test_rpnt_serve_process(tiny):
    tmp = short_ipc_dir()
    ingest, publish = f"ipc://{tmp}/in", f"ipc://{tmp}/out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rpnt_core.cli",
            "serve",
            "--model",
            str(tiny["export"]),
            "--registry",
            f"{tmp}/registry",
            "--no-http",
            "--ingest",
            ingest,
            "--publish",
            publish,
            "--stats-interval",
            "0",
            "--gc-freeze",
            "--log-format",
            "json",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    try:
        rig = RigClient(endpoint=ingest, source_id=5)
        sub = PredictionSubscriber(endpoint=publish)
        status = wait_for_daemon(rig, sub, timeout=LIVE_TIMEOUT)
        assert status["n_channels"] == 8 and status["bin_ns"] == BIN_NS
        counts = np.random.default_rng(5).poisson(2.0, (40, 8))
        send_stream(rig, counts)
        preds = collect(sub, 40)
        rig.close()
        sub.close()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=LIVE_TIMEOUT)
    assert proc.returncode == 0, err
    assert [p.bin for p in preds] == list(range(40))
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    ready = next(x for x in lines if x.get("event") == "ready")
    stopped = next(x for x in lines if x.get("event") == "stopped")
    assert ready["torch_imported"] is False and ready["startup"]["gc_freeze"]["applied"] is True
    assert stopped["snapshot"]["counters"]["bins"] == 40


def test_rpnt_serve_usage_errors(tiny, capsys):
    from streaming.cli import serve_main

    assert serve_main(["--model", str(tiny["export"] / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert serve_main(["--model", str(tiny["export"]), "--bin-ms", "50"]) == 2
    assert "trained at 20 ms" in capsys.readouterr().err
    assert serve_main(["--model", str(tiny["export"]), "--ingest", "tcp://0.0.0.0:1"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert serve_main(["--model", str(tiny["ckpt"])]) == 2
    assert "rpnt export" in capsys.readouterr().err
