"""``rpnt serve --ingest-adapter / --publish-adapter``: one setting each (``daemon.ingest_adapters``,
``daemon.publish_adapters``) with its flag derived; a bad spec exits 2 with one line naming the
setting; and the real CLI in a child process, fed through a Redis stream, decodes exactly what the
native replay decodes, republishes every prediction to Redis, and reports the adapters' counters."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import REPO
from test_serve_startup import Serve, _env, _serve_cmd
from test_streaming_support import BIN_NS, short_ipc_dir, tiny_export, wait_until


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


@pytest.fixture
def ipc():
    d = short_ipc_dir()
    return ["--ingest", f"ipc://{d}/in", "--publish", f"ipc://{d}/out"]


@pytest.mark.parametrize(
    ("flag", "spec", "says"),
    [
        ("--ingest-adapter", "kafka:topic", "daemon.ingest_adapters: kafka:topic: expected KIND:TARGET"),
        ("--publish-adapter", "openephys:tcp://127.0.0.1:5556", "openephys is an ingest adapter only"),
        ("--ingest-adapter", "lsl:rig?colour=red", "unknown option colour for lsl ingest"),
        ("--ingest-adapter", "redis:", "nothing after 'redis:'"),
    ],
)
def test_a_bad_adapter_spec_exits_2_naming_the_setting(tmp_path, tiny, ipc, flag, spec, says):
    r = subprocess.run(
        _serve_cmd(
            "--model", str(tiny["export"]), "--registry", str(tmp_path / "reg"), "--no-http", *ipc, flag, spec
        ),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("rpnt serve: error: invalid settings:"), r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 2
    assert not (tmp_path / "reg").exists()


def test_adapter_settings_come_from_flags_env_and_file_alike(tmp_path):
    from service.cli import build_parser, overrides_from_args
    from service.settings import load_settings

    a = build_parser().parse_args(
        ["--ingest-adapter", "lsl:a", "--ingest-adapter", "redis:k", "--publish-adapter", "lsl:out"]
    )
    s = load_settings(env={}, overrides=overrides_from_args(a))
    assert s.daemon.ingest_adapters == ["lsl:a", "redis:k"] and s.daemon.publish_adapters == ["lsl:out"]
    assert load_settings(env={"RPNT_DAEMON__PUBLISH_ADAPTERS": '["redis:p"]'}).daemon.publish_adapters == [
        "redis:p"
    ]
    cfg = tmp_path / "rpnt.toml"
    cfg.write_text('[daemon]\ningest_adapters = ["openephys:tcp://127.0.0.1:5556?rate=30000"]\n')
    assert load_settings(cfg, env={}).daemon.ingest_adapters == ["openephys:tcp://127.0.0.1:5556?rate=30000"]
    assert "ingest_adapters" not in overrides_from_args(build_parser().parse_args([])).get("daemon", {})
    helps = {x.dest: x.help for x in build_parser()._actions}
    assert "[daemon.ingest_adapters]" in helps["ingest_adapter"]
    assert "[daemon.publish_adapters]" in helps["publish_adapter"]


def test_rpnt_serve_fed_through_redis_decodes_like_the_native_replay(tmp_path, tiny, ipc):
    redis = pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    from test_adapters_redis import RedisServer, _free_port, spike_entries, xadd_all

    from streaming.replay import run_replay

    server = RedisServer(_free_port()).start()
    port = server.port
    spec_in, spec_out = f"redis:rig?port={port}&start=0", f"redis:out?port={port}"
    counts = tiny["counts"][:150]
    T = counts.shape[0]
    srv = Serve(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(tmp_path / "registry"),
        "--no-http",
        *ipc,
        "--ingest-adapter",
        spec_in,
        "--publish-adapter",
        spec_out,
        env=_env(RPNT_LOG_FORMAT="json"),
    )
    client = redis.Redis(port=port)
    try:
        ready = json.loads(srv.lines[srv.wait_for('{"event": "ready"')])
        native = run_replay(counts=counts, bin_ns=BIN_NS, ingest=ipc[1], publish=ipc[3], realtime=False)
        xadd_all(client, "rig", [{"reset": -1, "free_run": 1}] + spike_entries(counts))
        assert wait_until(lambda: client.xlen("out") >= 2 * T, timeout=120)
        entries = client.xrange("out")
    finally:
        rc = srv.stop()
        server.stop()
    assert rc == 0
    assert ready["adapters"] == [f"ingest {spec_in}", f"publish {spec_out}"]
    assert native.bins_lost == 0 and len(entries) == 2 * T
    y = np.stack([np.frombuffer(f[b"y"], "<f4") for _, f in entries])
    np.testing.assert_array_equal(y[:T], native.velocity)  # the native replay, republished exactly
    np.testing.assert_array_equal(y[T:], native.velocity)  # the Redis-fed stream, decoded exactly alike
    epochs = [int(f[b"epoch"]) for _, f in entries]
    assert len(set(epochs[:T])) == 1 and set(epochs[T:]) == {epochs[0] + 1}
    stopped = next(json.loads(ln) for ln in srv.lines if ln and ln.startswith('{"event": "stopped"'))
    st_in = stopped["snapshot"]["adapters"][f"ingest {spec_in}"]
    st_out = stopped["snapshot"]["adapters"][f"publish {spec_out}"]
    assert st_in["received"] == T + 1 and st_in["rejected"] == {} and st_in["lost"] == 0
    assert st_out["forwarded"] == 2 * T and st_out["lost"] == 0


def test_the_start_up_summary_names_the_adapters():
    from streaming.serving import ready_summary

    ready = {
        "model_version": "abc",
        "n_channels": 8,
        "n_outputs": 2,
        "bin_s": 0.02,
        "ingest": "ipc://i",
        "publish": "ipc://o",
        "startup": {},
    }
    assert len(ready_summary(ready)) == 2
    lines = ready_summary({**ready, "adapters": ["ingest lsl:rig", "publish redis:out"]})
    assert lines[2] == "  adapters  ingest lsl:rig, publish redis:out"
