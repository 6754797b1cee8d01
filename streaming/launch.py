"""Loading a decoder for the daemon, and starting a daemon for a replay (thread or child process).

:func:`load_decoder` goes through :func:`exporters.runtime.load_engine`; with an ONNX back-end
nothing here imports torch (the daemon's start-up path), with ``backend="torch"`` the torch engine
is loaded (development).  :func:`held_endpoints` checks, before anything is set up, that the
daemon's endpoints can be bound.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rpnt_core.child_env import ROOT, child_env

from .options import BACKENDS, EngineConfig, check_endpoint

_ENGINE = EngineConfig()  # the declared engine defaults


def load_decoder(
    model: str | os.PathLike,
    *,
    backend: str = _ENGINE.backend,
    precision: str = _ENGINE.precision,
    intra_op_threads: int = _ENGINE.intra_op_threads,
    allow_spinning: bool = False,
) -> Any:
    """An engine implementing the decoder contract, from an export directory / .onnx file (ONNX
    back-ends) or a checkpoint / export directory (``torch``)."""
    p = Path(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not p.exists():
        raise FileNotFoundError(f"model: no such file or directory: {p}")
    from exporters.runtime import load_engine

    if backend == "torch":
        return load_engine(p, backend="torch")
    if p.is_file() and p.suffix == ".safetensors":
        raise ValueError(
            f"model: {p} is a checkpoint; the ONNX back-ends need an export — run "
            f"`rpnt export {p} --out DIR` and serve DIR (or use --backend torch for development)"
        )
    return load_engine(
        p,
        backend=backend,
        precision=precision,
        intra_op_threads=intra_op_threads,
        allow_spinning=allow_spinning,
    )


def ipc_endpoints(directory: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """(ingest, publish, directory): fresh ipc:// endpoints in a private temporary directory."""
    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="rpnt-"))
    return f"ipc://{d / 'ingest'}", f"ipc://{d / 'publish'}", str(d)


def spawn_daemon(
    *,
    model: str | os.PathLike,
    bin_ms: float,
    ingest: str,
    publish: str,
    backend: str = _ENGINE.backend,
    precision: str = _ENGINE.precision,
    extra: list[str] | None = None,
    log_path: str | os.PathLike | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """``rpnt serve`` in a child process (its own interpreter and GIL; JSON event lines in
    ``log_path``).  Wait for it with
    :func:`streaming.client.wait_for_daemon`; stop it with ``proc.send_signal(SIGINT)``."""
    cmd = [
        sys.executable,
        "-m",
        "streaming.cli",
        "serve",
        "--model",
        str(model),
        "--backend",
        backend,
        "--precision",
        precision,
        "--bin-ms",
        repr(float(bin_ms)),
        "--ingest",
        ingest,
        "--publish",
        publish,
        "--stats-interval",
        "0",
        "--log-format",
        "json",
        *(extra or []),
    ]
    with ExitStack() as stack:
        out = stack.enter_context(open(log_path, "ab")) if log_path is not None else subprocess.DEVNULL
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(env), cwd=str(ROOT))


class EndpointError(ValueError):
    """An endpoint the daemon could not bind; the message starts with the endpoint's name."""


@contextmanager
def held_endpoints(
    endpoints: Mapping[str, str], *, allow_remote: bool, remote_option: str = "--allow-remote"
) -> Iterator[None]:
    """Check that the daemon could bind each of ``endpoints`` (name → ZeroMQ endpoint) now, and hold
    them for the body of the ``with`` (so a later check, e.g. of the HTTP port, sees them taken).

    ``tcp://`` endpoints are bound (loopback only unless ``allow_remote``) and released on exit;
    for ``ipc://`` the directory must exist and no live socket may listen at the path (a bind
    would take the path over from a running daemon, so the check connects instead of binding);
    ``inproc://`` needs nothing.  Raises :class:`EndpointError` ``"<name>: <what is wrong>"``;
    ``remote_option`` is what the message tells the user to set to allow a non-loopback address."""
    import zmq

    seen: dict[str, str] = {}
    with ExitStack() as stack:
        ctx = zmq.Context()
        stack.callback(ctx.term)
        for name, endpoint in endpoints.items():
            try:
                check_endpoint(endpoint, allow_remote=True)
            except ValueError as exc:
                raise EndpointError(f"{name}: {exc}") from None
            try:
                check_endpoint(endpoint, allow_remote=allow_remote)
            except ValueError:
                raise EndpointError(
                    f"{name}: {endpoint} is not a loopback address; set {remote_option} to bind "
                    "other interfaces"
                ) from None
            if endpoint in seen:
                raise EndpointError(
                    f"{name}: {endpoint} is also {seen[endpoint]}; the two need different endpoints"
                )
            seen[endpoint] = name
            if endpoint.startswith("tcp://"):
                stack.enter_context(_bound_tcp(ctx, name, endpoint))
            elif endpoint.startswith("ipc://"):
                _check_ipc_free(name, endpoint[len("ipc://") :])
        yield


@contextmanager
def _bound_tcp(ctx, name: str, endpoint: str) -> Iterator[None]:
    """A PULL socket bound (and so listening) at ``endpoint`` for the body of the ``with``."""
    import zmq

    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise EndpointError(f"{name}: cannot bind {endpoint}: {os.strerror(exc.errno)}") from None
        yield
    finally:
        sock.close(0)


def _check_ipc_free(name: str, path: str) -> None:
    """No live socket at ``path`` and its directory exists (a stale socket file is fine: the bind
    replaces it)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise EndpointError(f"{name}: ipc://{path}: directory {p.parent} does not exist")
    if not p.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(p))
    except OSError:
        return  # stale or not a socket: nothing listens there
    finally:
        probe.close()
    raise EndpointError(f"{name}: ipc://{path} is in use (another daemon listens there)")
