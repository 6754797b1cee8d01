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
from typing import TYPE_CHECKING, get_args

if TYPE_CHECKING:
    from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

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


def build_parser() -> argparse.ArgumentParser:
    from streaming.cli import SERVE_DESCRIPTION, add_daemon_options
    from streaming.launch import BACKENDS

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
        "--model",
        metavar="DIR_OR_CKPT",
        help="export directory or .safetensors checkpoint that seeds an empty registry [model.path]",
    )
    p.add_argument(
        "--replace-active",
        action="store_true",
        help="import --model as a new version and make it active even if the registry has one",
    )
    p.add_argument("--registry", metavar="DIR", help="model registry directory [registry.root]")
    p.add_argument("--backend", choices=BACKENDS, help="inference engine [model.backend]")
    p.add_argument(
        "--precision", choices=("fp32", "int8", "fp16"), help="step graph to run [model.precision]"
    )
    p.add_argument("--bin-ms", type=float, help="bin width in ms (default: the model's) [daemon.bin_ms]")
    p.add_argument("--ingest", help="PULL endpoint for rig messages [daemon.ingest]")
    p.add_argument("--publish", help="PUB endpoint for predictions [daemon.publish]")
    p.add_argument(
        "--record-nwb",
        metavar="OUT.nwb",
        help="record the session: every decoded bin (counts, decoded target, flags, per-stage latencies, "
        "model version, the rig's kinematics) written to this NWB file at stop (docs/nwb.md) "
        "[daemon.record_nwb]",
    )
    p.add_argument(
        "--ingest-adapter",
        action="append",
        metavar="KIND:TARGET",
        help="also take rig data from a foreign source, e.g. lsl:STREAM, redis:KEY, "
        "openephys:tcp://HOST:PORT (repeatable; docs/adapters.md) [daemon.ingest_adapters]",
    )
    p.add_argument(
        "--publish-adapter",
        action="append",
        metavar="KIND:TARGET",
        help="also republish predictions, e.g. lsl:NAME, redis:KEY (repeatable) [daemon.publish_adapters]",
    )
    p.add_argument("--http-host", help="HTTP bind address [http.host]")
    p.add_argument("--http-port", type=int, help="HTTP port, 0 = any free one [http.port]")
    p.add_argument(
        "--no-http", action="store_true", help="do not serve the HTTP control plane [http.enabled]"
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="log a one-line summary every S seconds (0: never; default 10)",
    )
    p.add_argument("--log-level", choices=_choices("log_level"), help="[log_level]")
    p.add_argument(
        "--log-format",
        choices=_choices("log_format"),
        help="start/stop messages: a summary for people, or JSON event lines [log_format]",
    )
    add_daemon_options(p, defaults=False)
    return p


def _choices(field: str) -> tuple[str, ...]:
    """The values a top-level ``Literal`` setting accepts (so the flag and the setting agree)."""
    from .settings import Settings

    return get_args(Settings.model_fields[field].annotation)


def overrides_from_args(a: argparse.Namespace) -> dict:
    """The flags that were given, as a nested settings dict (flags not given do not override)."""
    table = {
        "model": {"path": a.model, "backend": a.backend, "precision": a.precision},
        "registry": {"root": a.registry},
        "daemon": {
            "bin_ms": a.bin_ms,
            "ingest": a.ingest,
            "publish": a.publish,
            "stall_ms": a.stall_ms,
            "record_nwb": a.record_nwb,
            "max_jump_s": a.max_jump_s,
            "history_s": a.history_s,
            "warmup_bins": a.warmup_bins,
            "affinity": list(a.affinity) if a.affinity else None,
            "busy_poll_us": a.busy_poll_us,
            "prewarm_lead_us": a.prewarm_lead_us,
            "rt_priority": a.rt_priority,
            "gc_freeze": a.gc_freeze or None,
            "allow_bin_mismatch": a.allow_bin_mismatch or None,
            "allow_remote": a.allow_remote or None,
            "ingest_adapters": a.ingest_adapter,
            "publish_adapters": a.publish_adapter,
        },
        "http": {"host": a.http_host, "port": a.http_port, "enabled": False if a.no_http else None},
    }
    out: dict = {k: {f: v for f, v in sec.items() if v is not None} for k, sec in table.items()}
    out = {k: v for k, v in out.items() if v}
    out.update({k: v for k, v in (("log_level", a.log_level), ("log_format", a.log_format)) if v})
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
        from streaming.cli import nwb_output_problem

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


def serve_main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from streaming.launch import EndpointError

    from .settings import SettingsError, load_settings, resolve_token

    try:
        settings = load_settings(a.config, overrides=overrides_from_args(a))
        check_startup(settings, replace_active=a.replace_active)
    except (SettingsError, EndpointError) as exc:
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("rpnt.serve")

    from streaming.cli import serve_until_stopped
    from streaming.daemon import Daemon, DaemonOptions

    from .control import ControlPlane
    from .registry import ModelRegistry, RegistryError

    t0 = time.perf_counter()
    root = Path(settings.registry.root)
    fresh = not root.exists()  # a registry this start creates is removed again if the start fails
    try:
        registry = ModelRegistry(root=root)
        version, engine = open_live_model(registry, settings, replace_active=a.replace_active, log=log)
        bin_s = settings.daemon.bin_ms / 1e3 if settings.daemon.bin_ms else float(engine.info.bin_s)
        daemon = Daemon(
            decoder=engine,
            bin_s=bin_s,
            ingest=settings.daemon.ingest,
            publish=settings.daemon.publish,
            options=DaemonOptions.from_fields(settings.daemon),
        )
        token, token_source = resolve_token(settings) if settings.http.enabled else ("", "")
    except (RegistryError, SettingsError, FileNotFoundError, ValueError, OSError) as exc:
        if fresh:
            shutil.rmtree(root, ignore_errors=True)
        print(f"rpnt serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    load_s = time.perf_counter() - t0
    control = ControlPlane(daemon=daemon, registry=registry, settings=settings, live_version=version)
    # the decode thread and the HTTP thread share one interpreter: a short switch interval bounds how
    # long a request handler can keep the decode loop waiting for the GIL
    sys.setswitchinterval(settings.daemon.switch_interval_ms / 1e3)

    http: dict = {}  # the uvicorn server and its thread, once started

    def start_http(stop: threading.Event) -> dict:
        if not settings.http.enabled:
            return {"http": None}
        import uvicorn

        from .app import create_app

        config = uvicorn.Config(
            create_app(control, token=token),
            host=settings.http.host,
            port=settings.http.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="rpnt-http", daemon=True)
        thread.start()
        http.update(server=server, thread=thread)
        while not server.started and thread.is_alive() and not stop.is_set():
            time.sleep(0.01)
        if not server.started and not stop.is_set():
            raise RuntimeError(
                f"the HTTP server did not start on {settings.http.host}:{settings.http.port} (port in use?)"
            )
        if not server.started:  # SIGINT/SIGTERM while it started: a normal stop
            return {"http": None}
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        return {"http": f"http://{host}:{port}"}

    bridges: list = []  # the adapters, once started

    def start_all(stop: threading.Event) -> dict:
        from streaming.adapters import start_adapters

        bridges.extend(
            start_adapters(
                daemon, ingest=settings.daemon.ingest_adapters, publish=settings.daemon.publish_adapters
            )
        )
        out = start_http(stop)
        if bridges:
            out["adapters"] = [f"{b.direction} {b.spec.text}" for b in bridges]
        return out

    def stop_all() -> None:
        from streaming.adapters import stop_adapters

        stop_adapters(bridges)
        stop_http()

    def stop_http() -> None:
        control.closing.set()  # /events streams end, so uvicorn's graceful shutdown does not wait on them
        if http:
            http["server"].should_exit = True
            http["thread"].join(10.0)
        control.calibration.shutdown()

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
        after_start=start_all,
        before_stop=stop_all,
    )
    if settings.daemon.record_nwb:
        from streaming.cli import write_recording

        rc = max(rc, write_recording(daemon, settings.daemon.record_nwb, log_format=settings.log_format))
    return rc
