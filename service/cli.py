"""``rpnt serve``: the real-time decoder daemon and its HTTP control plane, as one process.

Start-up, in order (each step fails with a clear message and exit status 2 before anything binds):

1. settings: defaults < ``--config`` TOML < ``RPNT_*`` environment < these flags
   (:mod:`service.settings`); then, before anything is written, the checks that need no model:
   the API token file (when one is configured), ``model.path`` exists (when it is to be
   imported), each adapter's library is installed, the ZeroMQ endpoints are allowed (loopback
   unless ``daemon.allow_remote``) and free, and the HTTP port is free (each bound and released
   again);
2. the model registry at ``registry.root``: an empty registry is seeded from ``--model``
   (an export directory, or a checkpoint that is exported here in a child process); a registry
   with an active version keeps it — that is what brings a restarted daemon back on its last good
   model — unless ``--replace-active`` imports ``--model`` as a new version and activates it;
3. the active version's engine is loaded and warmed up (if it no longer loads, the most recent
   earlier active version that does is used, and that fallback is recorded);
4. the decode loop starts in its own thread (``streaming.daemon.Daemon``), then the adapters
   (``daemon.ingest_adapters`` / ``daemon.publish_adapters``: bridges to LSL, Redis streams, Open
   Ephys — docs/adapters.md) each in a thread, then uvicorn serves the control plane
   (``service.app``) in another; calibration jobs run in child processes.

Once serving, a three-line summary on stderr gives the HTTP address (``--http-port 0`` picks a
free port), the ZeroMQ endpoints and where the API token is; with ``--log-format json``
(``log_format``) a ``{"event": "ready", ...}`` JSON line says that and more (model, start-up
habits).  SIGINT/SIGTERM stop everything; the final counters follow (a ``{"event": "stopped",
...}`` line in JSON).
"""

from __future__ import annotations

import argparse
import errno
import logging
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from streaming.flags import Flag, add_flags, given
from streaming.options import TUNING
from streaming.serving import EXIT_USAGE

if TYPE_CHECKING:
    from .settings import Settings

EPILOG = """\
examples:
  rpnt serve --model exports/m1                       # seeds ./rpnt-registry, HTTP on 127.0.0.1:8000
  rpnt serve --config /etc/rpnt/rpnt.toml             # everything from the config file
  rpnt serve --model ft.safetensors --registry /var/lib/rpnt --http-port 0 --affinity 1 --gc-freeze
  RPNT_DAEMON__BIN_MS=50 rpnt serve --model exports/m1
  rpnt serve --model exports/m1 --no-http             # the decode loop alone

control plane (see deploy/OPERATIONS.md): GET / (live page) /events /docs /health /ready /status /metrics /models
/calibrate/{id};
POST /calibrate and POST /models/{version}/activate need 'Authorization: Bearer <token>'.
"""


#: the flags that set a setting: (section, flag) — section "" for a top-level setting; help, type,
#: choices and metavar come from the setting's field (:mod:`service.settings`)
SETTING_FLAGS: tuple[tuple[str, Flag], ...] = (
    ("model", Flag("path", "--model")),
    ("model", Flag("backend")),
    ("model", Flag("precision")),
    ("registry", Flag("root", "--registry")),
    ("daemon", Flag("bin_ms")),
    ("daemon", Flag("ingest")),
    ("daemon", Flag("publish")),
    ("daemon", Flag("record_nwb")),
    ("daemon", Flag("ingest_adapters", "--ingest-adapter")),
    ("daemon", Flag("publish_adapters", "--publish-adapter")),
    ("http", Flag("host", "--http-host")),
    ("http", Flag("port", "--http-port")),
    ("http", Flag("enabled", "--no-http", invert=True)),
    ("", Flag("log_level")),
    ("", Flag("log_format")),
) + tuple(("daemon", Flag(name)) for name in TUNING)


def _model_of(section: str) -> type:
    from .settings import SECTIONS, Settings

    return SECTIONS[section] if section else Settings


def build_parser() -> argparse.ArgumentParser:
    from streaming.cli import SERVE_DESCRIPTION, add_stats_interval

    p = argparse.ArgumentParser(
        prog="rpnt serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=SERVE_DESCRIPTION + "\n" + __doc__.split("\n\n", 1)[1].split("\n\nA ")[0],
        epilog=EPILOG,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML settings file (default: $RPNT_CONFIG; every setting: deploy/rpnt.example.toml)",
    )
    p.add_argument(
        "--replace-active",
        action="store_true",
        help="import --model as a new version and make it active even if the registry has one",
    )
    add_stats_interval(p)
    tuning = p.add_argument_group("daemon options")
    for section, flag in SETTING_FLAGS:
        where = tuning if section == "daemon" and flag.field in TUNING else p
        add_flags(where, _model_of(section), (flag,), defaults=False, section=section)
    return p


def overrides_from_args(a: argparse.Namespace) -> dict:
    """The flags that were given, as a nested settings dict (flags not given do not override)."""
    out: dict = {}
    for section, flag in SETTING_FLAGS:
        for field, value in given(a, (flag,)).items():
            (out.setdefault(section, {}) if section else out)[field] = value
    return out


@contextmanager
def held_http_port(host: str, port: int) -> Iterator[None]:
    """Check that the control plane could listen on ``host:port`` now (as uvicorn will: every
    address ``host`` resolves to, ``SO_REUSEADDR``) and hold the port for the body of the ``with``.
    Port 0 (any free port) always passes.  Raises :class:`~streaming.launch.EndpointError`."""
    from streaming.launch import EndpointError

    if port == 0:
        yield
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EndpointError(f"http.host: cannot resolve {host}: {exc.strerror}") from None
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
                sock.listen(1)
            except OSError as exc:
                raise EndpointError(_http_bind_error(host, port, exc)) from None
        yield
    finally:
        for sock in held:
            sock.close()


def _http_bind_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"http.port: {host}:{port} is already in use; choose another port (--http-port, http.port; "
            "0 = any free port)"
        )
    return f"http.port: cannot listen on {host}:{port}: {exc.strerror or exc}"


def check_startup(settings: "Settings", *, replace_active: bool) -> None:
    """Step 1's checks that need no model and write nothing (see the module docstring); ``model.path``
    must exist only when it will be imported (an empty registry, or ``replace_active``).  Raises
    :class:`~service.settings.SettingsError` or :class:`~streaming.launch.EndpointError` naming the
    setting."""
    from streaming.launch import held_endpoints

    from .registry import holds_versions
    from .settings import SettingsError, configured_token

    if settings.http.enabled:
        configured_token(settings)
    path = settings.model.path
    if path and not Path(path).exists() and (replace_active or not holds_versions(settings.registry.root)):
        raise SettingsError(f"model.path: no such file or directory: {path}")
    d = settings.daemon
    if d.record_nwb:
        from streaming.serving import nwb_output_problem

        problem = nwb_output_problem(d.record_nwb)
        if problem:
            raise SettingsError(f"daemon.record_nwb: {problem}")
    check_adapters(d)
    with held_endpoints(
        {"daemon.ingest": d.ingest, "daemon.publish": d.publish},
        allow_remote=d.allow_remote,
        remote_option="daemon.allow_remote = true (--allow-remote)",
    ):
        if settings.http.enabled:
            with held_http_port(settings.http.host, settings.http.port):
                pass


def check_adapters(daemon_settings) -> None:
    """Every ``daemon.ingest_adapters`` / ``daemon.publish_adapters`` spec has its library installed
    (the specs themselves were checked by the settings model); :class:`~service.settings.SettingsError`
    naming the setting otherwise."""
    from streaming.adapters import AdapterError, check_available, parse_spec

    from .settings import SettingsError

    for field in ("ingest_adapters", "publish_adapters"):
        for text in getattr(daemon_settings, field):
            try:
                check_available(parse_spec(text, direction=field.split("_", 1)[0]))
            except AdapterError as exc:
                raise SettingsError(f"daemon.{field}: {exc}") from None


def open_live_model(registry, settings, *, replace_active: bool, log: logging.Logger):
    """Steps 2–3 of the module docstring: (version, engine)."""
    from .control import load_version_engine
    from .registry import RegistryError

    path = settings.model.path
    if path and (replace_active or not registry.versions()):
        v = registry.import_model(path, source="seed" if not registry.versions() else "import")
        registry.activate(v, reason=f"imported from {path}")
        log.info("model %s imported as registry version %s", path, v)
    elif path and registry.active():
        log.info(
            "registry %s has active version %s; --model %s not imported (use --replace-active)",
            registry.root,
            registry.active(),
            path,
        )
    candidates = registry.candidates_for_start()
    if not candidates:
        raise RegistryError(
            f"registry {registry.root} has no model yet: pass --model DIR_OR_CKPT (model.path)"
        )
    failures = []
    for v in candidates:
        try:
            engine = load_version_engine(registry, v, settings)
        except Exception as exc:  # noqa: BLE001 - try the previous good version
            failures.append(f"version {v}: {exc}")
            log.error("model version %s does not load: %s", v, exc)
            continue
        if v != candidates[0]:
            registry.activate(v, reason=f"fallback at start: {'; '.join(failures)}")
        return v, engine
    raise RegistryError("no registry version loads: " + "; ".join(failures))


class _Sidecars:
    """What ``rpnt serve`` runs beside the decode loop: the adapters (each in a thread), then the
    HTTP control plane (uvicorn in a thread).  :meth:`start` is ``after_start``, :meth:`stop` is
    ``before_stop`` of :func:`~streaming.serving.serve_until_stopped`."""

    def __init__(self, *, daemon, control, settings: Settings, token: str) -> None:
        self.daemon = daemon
        self.control = control
        self.settings = settings
        self.token = token
        self.bridges: list = []
        self.server = None
        self.thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> dict:
        """Start the adapters, then HTTP; returns what the ready event adds (``http``, ``adapters``)."""
        from streaming.adapters import start_adapters

        d = self.settings.daemon
        self.bridges.extend(start_adapters(self.daemon, ingest=d.ingest_adapters, publish=d.publish_adapters))
        out = self._start_http(stop)
        if self.bridges:
            out["adapters"] = [f"{b.direction} {b.spec.text}" for b in self.bridges]
        return out

    def _start_http(self, stop: threading.Event) -> dict:
        """Serve the control plane; ``RuntimeError`` if uvicorn did not start (unless told to stop)."""
        h = self.settings.http
        if not h.enabled:
            return {"http": None}
        import uvicorn

        from .app import create_app

        config = uvicorn.Config(
            create_app(self.control, token=self.token),
            host=h.host,
            port=h.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self.server = server = uvicorn.Server(config)
        self.thread = thread = threading.Thread(target=server.run, name="rpnt-http", daemon=True)
        thread.start()
        while not server.started and thread.is_alive() and not stop.is_set():
            time.sleep(0.01)
        if not server.started and not stop.is_set():
            raise RuntimeError(f"the HTTP server did not start on {h.host}:{h.port} (port in use?)")
        if not server.started:  # SIGINT/SIGTERM while it started: a normal stop
            return {"http": None}
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        return {"http": f"http://{host}:{port}"}

    def stop(self) -> None:
        """Stop the adapters, end the /events streams, stop uvicorn, shut the calibration worker down."""
        from streaming.adapters import stop_adapters

        stop_adapters(self.bridges)
        self.control.closing.set()  # /events streams end, so uvicorn's graceful shutdown does not wait on them
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(10.0)
        self.control.calibration.shutdown()


def _settings_from(a: argparse.Namespace) -> Settings:
    """Step 1: the settings and the checks that need no model (``SettingsError`` / ``EndpointError``)."""
    from .settings import load_settings

    settings = load_settings(a.config, overrides=overrides_from_args(a))
    check_startup(settings, replace_active=a.replace_active)
    return settings


def _open_daemon(settings: Settings, *, replace_active: bool, log: logging.Logger) -> tuple:
    """Steps 2–3 and the daemon: (registry, live version, daemon, (token, where it came from)).
    A registry this start created is removed again when it fails."""
    from streaming.daemon import Daemon

    from .registry import ModelRegistry
    from .settings import resolve_token

    root = Path(settings.registry.root)
    fresh = not root.exists()
    try:
        registry = ModelRegistry(root=root)
        version, engine = open_live_model(registry, settings, replace_active=replace_active, log=log)
        d = settings.daemon
        daemon = Daemon(
            decoder=engine,
            bin_s=d.bin_s(engine.info.bin_s),
            ingest=d.ingest,
            publish=d.publish,
            options=d.options(),
        )
        token = resolve_token(settings) if settings.http.enabled else ("", "")
    except BaseException:
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return registry, version, daemon, token


def serve_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from streaming.launch import EndpointError
    from streaming.serving import serve_until_stopped, write_recording

    from .control import ControlPlane
    from .registry import RegistryError
    from .settings import SettingsError

    try:
        settings = _settings_from(a)
    except (SettingsError, EndpointError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("rpnt.serve")
    t0 = time.perf_counter()
    try:
        registry, version, daemon, (token, token_source) = _open_daemon(
            settings, replace_active=a.replace_active, log=log
        )
    except (RegistryError, SettingsError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    load_s = time.perf_counter() - t0
    control = ControlPlane(daemon=daemon, registry=registry, settings=settings, live_version=version)
    # the decode thread and the HTTP thread share one interpreter: a short switch interval bounds how
    # long a request handler can keep the decode loop waiting for the GIL
    sys.setswitchinterval(settings.daemon.switch_interval_ms / 1e3)
    sidecars = _Sidecars(daemon=daemon, control=control, settings=settings, token=token)
    rc = serve_until_stopped(
        daemon,
        ready_fields={
            "token_source": token_source or None,
            "registry": str(registry.root),
            "registry_version": version,
            "model_loaded_s": round(load_s, 3),
            "switch_interval_ms": sys.getswitchinterval() * 1e3,
        },
        stats_interval=a.stats_interval,
        log=log,
        log_format=settings.log_format,
        after_start=sidecars.start,
        before_stop=sidecars.stop,
    )
    if settings.daemon.record_nwb:
        rc = max(rc, write_recording(daemon, settings.daemon.record_nwb, log_format=settings.log_format))
    return rc
