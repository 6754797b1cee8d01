"""``rpnt serve`` start-up: everything that needs no model is checked first — settings, the ZeroMQ
endpoints (allowed, free), the HTTP port (free), the token file, ``model.path`` — and a failure
exits 2 with one line naming the setting, before the registry is created or seeded.

``rpnt serve`` runs as a child process (the real CLI, real sockets); waits are liveness guards,
never timing assertions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

for _mod in ("fastapi", "uvicorn", "zmq", "onnxruntime", "pydantic"):
    pytest.importorskip(_mod)

from conftest import REPO  # noqa: E402
from test_streaming_support import short_ipc_dir, tiny_export  # noqa: E402

LIVE = 120.0  # liveness guard for a child process; never a timing assertion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


def _env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RPNT_")}
    e.update({"OMP_NUM_THREADS": "1", **extra})
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rpnt_core.cli", "serve", "--stats-interval", "0", *args]


def _fails(*args: str, env: dict | None = None) -> str:
    """Run ``rpnt serve`` expecting a start-up error: asserts exit 2, a single stderr line, no
    traceback; returns that line."""
    r = subprocess.run(_serve_cmd(*args), cwd=REPO, env=env or _env(), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=LIVE)
    lines = r.stderr.splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("rpnt serve: error: "), r.stderr
    return lines[0]


@pytest.fixture
def ipc():
    d = short_ipc_dir()
    return ["--ingest", f"ipc://{d}/in", "--publish", f"ipc://{d}/out"]


@pytest.fixture
def busy_port():
    """A loopback TCP port another program listens on."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


# ============================================================================ failures: exit 2, nothing written
def test_busy_http_port_exits_2_naming_the_port_and_leaves_no_registry(tmp_path, tiny, ipc, busy_port):
    reg = tmp_path / "registry"
    line = _fails("--model", str(tiny["export"]), "--registry", str(reg), "--http-port", str(busy_port), *ipc)
    assert f"http.port: 127.0.0.1:{busy_port} is already in use" in line, line
    assert not reg.exists()


def test_busy_zeromq_port_exits_2_naming_the_endpoint(tmp_path, tiny, busy_port):
    reg = tmp_path / "registry"
    ingest = f"tcp://127.0.0.1:{busy_port}"
    line = _fails("--model", str(tiny["export"]), "--registry", str(reg), "--http-port", "0",
                  "--ingest", ingest, "--publish", f"ipc://{short_ipc_dir()}/out")
    assert f"daemon.ingest: cannot bind {ingest}: Address already in use" in line, line
    assert not reg.exists()


def test_http_port_on_a_zeromq_endpoint_of_the_same_daemon_exits_2(tmp_path, tiny):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a free port, named twice below
    reg = tmp_path / "registry"
    line = _fails("--model", str(tiny["export"]), "--registry", str(reg), "--http-port", str(port),
                  "--ingest", f"tcp://127.0.0.1:{port}", "--publish", f"ipc://{short_ipc_dir()}/out")
    assert str(port) in line and ("http.port" in line or "daemon.ingest" in line), line
    assert not reg.exists()


def test_non_loopback_endpoint_without_opt_in_exits_2_and_writes_nothing(tmp_path, tiny):
    reg = tmp_path / "registry"
    line = _fails("--model", str(tiny["export"]), "--registry", str(reg), "--http-port", "0",
                  "--ingest", "tcp://0.0.0.0:5599", "--publish", f"ipc://{short_ipc_dir()}/out")
    assert line == ("rpnt serve: error: daemon.ingest: tcp://0.0.0.0:5599 is not a loopback address; set "
                    "daemon.allow_remote = true (--allow-remote) to bind other interfaces"), line
    assert not reg.exists()
    assert list(tmp_path.iterdir()) == []


def test_same_endpoint_twice_exits_2(tmp_path, tiny):
    ep = f"ipc://{short_ipc_dir()}/both"
    line = _fails("--model", str(tiny["export"]), "--registry", str(tmp_path / "registry"), "--http-port", "0",
                  "--ingest", ep, "--publish", ep)
    assert f"daemon.publish: {ep} is also daemon.ingest" in line, line
    assert not (tmp_path / "registry").exists()


def test_ipc_endpoint_of_a_running_daemon_is_not_taken_over(tmp_path, tiny):
    """A bind would silently take the path over from the daemon listening there; the check
    connects instead, refuses, and leaves that daemon's socket working."""
    import zmq

    d = short_ipc_dir()
    ctx = zmq.Context()
    other = ctx.socket(zmq.PULL)
    other.bind(f"ipc://{d}/in")
    try:
        line = _fails("--model", str(tiny["export"]), "--registry", str(tmp_path / "registry"), "--http-port", "0",
                      "--ingest", f"ipc://{d}/in", "--publish", f"ipc://{d}/out")
        assert f"daemon.ingest: ipc://{d}/in is in use" in line, line
        push = ctx.socket(zmq.PUSH)
        push.connect(f"ipc://{d}/in")
        push.send(b"still mine")
        assert other.poll(int(LIVE * 1000)) and other.recv() == b"still mine"
        push.close(0)
    finally:
        other.close(0)
        ctx.term()
    assert not (tmp_path / "registry").exists()


def test_missing_model_and_unreadable_token_file_exit_2_before_the_registry(tmp_path, tiny, ipc):
    reg = tmp_path / "registry"
    line = _fails("--model", str(tmp_path / "nope"), "--registry", str(reg), "--http-port", "0", *ipc)
    assert line == f"rpnt serve: error: model.path: no such file or directory: {tmp_path / 'nope'}"
    line = _fails("--model", str(tiny["export"]), "--registry", str(reg), "--http-port", "0", *ipc,
                  env=_env(RPNT_AUTH__TOKEN_FILE=str(tmp_path / "no-token")))
    assert line.startswith("rpnt serve: error: auth.token_file: cannot read") and "Errno" not in line, line
    assert not reg.exists()


def test_a_missing_model_path_matters_only_when_it_would_be_imported(tmp_path, tiny):
    """A restart on a registry with versions ignores ``model.path``; so does the check (a seeding
    path deleted since must not keep the service down).  With --replace-active it is imported."""
    from service.cli import check_startup
    from service.registry import ModelRegistry
    from service.settings import SettingsError, load_settings

    reg = ModelRegistry(root=tmp_path / "registry")
    reg.activate(reg.import_model(tiny["export"]), reason="test")
    d = short_ipc_dir()
    settings = load_settings(env={}, overrides={
        "model": {"path": str(tmp_path / "deleted")}, "registry": {"root": str(reg.root)},
        "daemon": {"ingest": f"ipc://{d}/in", "publish": f"ipc://{d}/out"}, "http": {"port": 0},
        "auth": {"token": "t"}})
    check_startup(settings, replace_active=False)
    with pytest.raises(SettingsError, match="model.path: no such file or directory"):
        check_startup(settings, replace_active=True)
