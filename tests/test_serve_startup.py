"""``rpnt serve`` start-up: everything that needs no model is checked first — settings, the ZeroMQ
endpoints (allowed, free), the HTTP port (free), the token file, ``model.path`` — and a failure
exits 2 with one line naming the setting, before the registry is created or seeded.  Then the
human start-up summary (default) and the JSON event lines (``--log-format json``).

``rpnt serve`` runs as a child process (the real CLI, real sockets); waits are liveness guards,
never timing assertions.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import get_args

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
    r = subprocess.run(
        _serve_cmd(*args),
        cwd=REPO,
        env=env or _env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
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


def test_a_model_that_does_not_fit_the_stream_exits_2_and_leaves_no_registry(tmp_path, tiny, ipc):
    """Errors found only once the model is loaded (here: a 20 ms model asked to decode 50 ms bins)
    happen after the registry was created and seeded: a registry this start created is removed."""
    reg = tmp_path / "registry"
    r = subprocess.run(
        _serve_cmd(
            "--model", str(tiny["export"]), "--registry", str(reg), "--bin-ms", "50", "--http-port", "0", *ipc
        ),
        cwd=REPO,
        env=_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIVE,
    )
    last = r.stderr.splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("rpnt serve: error: bin width") and "50 ms" in last and "20 ms" in last, r.stderr
    assert not reg.exists()


def test_busy_zeromq_port_exits_2_naming_the_endpoint(tmp_path, tiny, busy_port):
    reg = tmp_path / "registry"
    ingest = f"tcp://127.0.0.1:{busy_port}"
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(reg),
        "--http-port",
        "0",
        "--ingest",
        ingest,
        "--publish",
        f"ipc://{short_ipc_dir()}/out",
    )
    assert f"daemon.ingest: cannot bind {ingest}: Address already in use" in line, line
    assert not reg.exists()


def test_http_port_on_a_zeromq_endpoint_of_the_same_daemon_exits_2(tmp_path, tiny):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a free port, named twice below
    reg = tmp_path / "registry"
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(reg),
        "--http-port",
        str(port),
        "--ingest",
        f"tcp://127.0.0.1:{port}",
        "--publish",
        f"ipc://{short_ipc_dir()}/out",
    )
    assert str(port) in line and ("http.port" in line or "daemon.ingest" in line), line
    assert not reg.exists()


def test_non_loopback_endpoint_without_opt_in_exits_2_and_writes_nothing(tmp_path, tiny):
    reg = tmp_path / "registry"
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(reg),
        "--http-port",
        "0",
        "--ingest",
        "tcp://0.0.0.0:5599",
        "--publish",
        f"ipc://{short_ipc_dir()}/out",
    )
    assert line == (
        "rpnt serve: error: daemon.ingest: tcp://0.0.0.0:5599 is not a loopback address; set "
        "daemon.allow_remote = true (--allow-remote) to bind other interfaces"
    ), line
    assert not reg.exists()
    assert list(tmp_path.iterdir()) == []


def test_same_endpoint_twice_exits_2(tmp_path, tiny):
    ep = f"ipc://{short_ipc_dir()}/both"
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(tmp_path / "registry"),
        "--http-port",
        "0",
        "--ingest",
        ep,
        "--publish",
        ep,
    )
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
        line = _fails(
            "--model",
            str(tiny["export"]),
            "--registry",
            str(tmp_path / "registry"),
            "--http-port",
            "0",
            "--ingest",
            f"ipc://{d}/in",
            "--publish",
            f"ipc://{d}/out",
        )
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
    line = _fails(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(reg),
        "--http-port",
        "0",
        *ipc,
        env=_env(RPNT_AUTH__TOKEN_FILE=str(tmp_path / "no-token")),
    )
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
    settings = load_settings(
        env={},
        overrides={
            "model": {"path": str(tmp_path / "deleted")},
            "registry": {"root": str(reg.root)},
            "daemon": {"ingest": f"ipc://{d}/in", "publish": f"ipc://{d}/out"},
            "http": {"port": 0},
            "auth": {"token": "t"},
        },
    )
    check_startup(settings, replace_active=False)
    with pytest.raises(SettingsError, match="model.path: no such file or directory"):
        check_startup(settings, replace_active=True)


# ============================================================================ what a good start prints
class Serve:
    """``rpnt serve`` in a child process; stderr collected by a thread."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.lines: list[str] = []
        self._got = threading.Condition()
        self.proc = subprocess.Popen(
            _serve_cmd(*args),
            cwd=REPO,
            env=env or _env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._got:
                self.lines.append(line.rstrip("\n"))
                self._got.notify_all()
        with self._got:
            self.lines.append(None)  # EOF
            self._got.notify_all()

    def wait_for(self, prefix: str, then: int = 0) -> int:
        """Index of the first line starting with ``prefix`` once ``then`` more lines followed it."""

        def found():
            for i, ln in enumerate(self.lines):
                if ln is None:
                    return -1
                if ln.startswith(prefix) and len(self.lines) > i + then:
                    return i
            return None

        with self._got:
            self._got.wait_for(lambda: found() is not None, LIVE)
            i = found()
        assert i is not None and i >= 0, "\n".join(str(x) for x in self.lines)
        return i

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(LIVE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10.0)
        return rc


def test_start_prints_a_three_line_summary_without_reprs_or_json(tmp_path, tiny):
    reg = tmp_path / "registry"
    d = short_ipc_dir()
    ingest, publish = f"ipc://{d}/in", f"ipc://{d}/out"
    srv = Serve(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(reg),
        "--http-port",
        "0",
        "--ingest",
        ingest,
        "--publish",
        publish,
    )
    try:
        i = srv.wait_for("rpnt serve: ready", then=2)
        head, http, zmq_ = srv.lines[i : i + 3]
        assert "registry version 1" in head and "8 channels" in head and "20 ms bins" in head, head
        url = http.split()[1]
        assert http.split()[0] == "HTTP" and url.startswith("http://127.0.0.1:"), http
        assert f"API token: {reg.resolve() / 'api-token'} (generated)" in http, http
        assert zmq_.split()[0] == "ZeroMQ" and ingest in zmq_ and publish in zmq_, zmq_
        import httpx

        assert httpx.get(url + "/health", timeout=LIVE).status_code == 200  # the URL is the real one
    finally:
        rc = srv.stop()
    lines = [ln for ln in srv.lines if ln is not None]
    assert rc == 0, "\n".join(lines)
    assert lines[-1].startswith("rpnt serve: stopped; bins 0"), lines
    assert not any(ln.lstrip().startswith("{") or "{'" in ln for ln in lines), lines  # no JSON, no dict repr
    assert not any("Traceback" in ln for ln in lines), lines


def test_log_format_json_prints_the_event_lines(tmp_path, tiny, ipc):
    import json

    srv = Serve(
        "--model",
        str(tiny["export"]),
        "--registry",
        str(tmp_path / "registry"),
        "--http-port",
        "0",
        *ipc,
        env=_env(RPNT_LOG_FORMAT="json", RPNT_API_TOKEN="t0k3n"),
    )
    try:
        ready = json.loads(srv.lines[srv.wait_for('{"event": "ready"')])
    finally:
        rc = srv.stop()
    assert rc == 0
    assert ready["token_source"] == "$RPNT_API_TOKEN" and ready["http"].startswith("http://127.0.0.1:")
    assert ready["registry_version"] == "1" and ready["ingest"] == ipc[1]
    stopped = [json.loads(ln) for ln in srv.lines if ln and ln.startswith('{"event": "stopped"')]
    assert len(stopped) == 1 and stopped[0]["snapshot"]["counters"]["bins"] == 0
    assert not any(ln and ln.startswith("rpnt serve: ready") for ln in srv.lines)


# ============================================================================ the setting and its flag
def test_log_format_is_one_setting_with_its_flag_derived():
    from service.cli import build_parser, overrides_from_args
    from service.settings import Settings, SettingsError, load_settings
    from streaming.cli import LOG_FORMATS, build_serve_parser

    choices = get_args(Settings.model_fields["log_format"].annotation)
    assert choices == LOG_FORMATS == ("text", "json")
    assert load_settings(env={}).log_format == "text"
    assert load_settings(env={"RPNT_LOG_FORMAT": "json"}).log_format == "json"
    a = build_parser().parse_args(["--log-format", "json"])
    assert (
        load_settings(env={"RPNT_LOG_FORMAT": "text"}, overrides=overrides_from_args(a)).log_format == "json"
    )
    assert "log_format" not in overrides_from_args(build_parser().parse_args([]))  # not given: no override
    with pytest.raises(SettingsError, match="log_format"):
        load_settings(env={"RPNT_LOG_FORMAT": "xml"})
    flag = next(x for x in build_parser()._actions if x.dest == "log_format")
    assert tuple(flag.choices) == choices and "[log_format]" in flag.help
    assert build_serve_parser().parse_args(["--model", "m"]).log_format == "text"


def test_ready_summary_notes_habits_that_were_not_applied():
    from streaming.serving import ready_summary

    ready = {
        "model_version": "abc",
        "n_channels": 8,
        "n_outputs": 2,
        "bin_s": 0.05,
        "ingest": "tcp://127.0.0.1:1",
        "publish": "tcp://127.0.0.1:2",
        "http": None,
        "startup": {
            "affinity": {"requested": [3], "applied": False, "detail": "CPU 3 does not exist"},
            "gc_freeze": {"requested": False, "applied": False, "detail": "not requested"},
            "warmup": {"requested": 32, "applied": True, "detail": "32 steps"},
        },
    }
    lines = ready_summary(ready)
    assert lines[0] == "rpnt serve: ready: model abc, 8 channels in, 2 outputs out, 50 ms bins"
    assert lines[1].split() == ["HTTP", "off", "(the", "decode", "loop", "alone)"]
    assert lines[3:] == ["  note: affinity was requested but not applied: CPU 3 does not exist"]
    assert len(ready_summary({**ready, "startup": {}})) == 3
