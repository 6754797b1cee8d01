"""Loading a decoder for the daemon, and starting a daemon for a replay (thread or child process).

:func:`load_decoder` goes through :func:`exporters.runtime.load_engine`; with an ONNX back-end
nothing here imports torch (the daemon's start-up path), with ``backend="torch"`` the torch engine
is loaded (development).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ONNX_BACKENDS = ("onnx-cpu", "onnx-cuda", "onnx-tensorrt")
BACKENDS = ONNX_BACKENDS + ("torch",)


def load_decoder(model: str | os.PathLike, *, backend: str = "onnx-cpu", precision: str = "fp32",
                 intra_op_threads: int = 1, allow_spinning: bool = False) -> Any:
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
        raise ValueError(f"model: {p} is a checkpoint; the ONNX back-ends need an export — run "
                         f"`rpnt export {p} --out DIR` and serve DIR (or use --backend torch for development)")
    return load_engine(p, backend=backend, precision=precision, intra_op_threads=intra_op_threads,
                       allow_spinning=allow_spinning)


def ipc_endpoints(directory: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """(ingest, publish, directory): fresh ipc:// endpoints in a private temporary directory."""
    d = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="rpnt-"))
    return f"ipc://{d / 'ingest'}", f"ipc://{d / 'publish'}", str(d)


def spawn_daemon(*, model: str | os.PathLike, bin_ms: float, ingest: str, publish: str, backend: str = "onnx-cpu",
                 precision: str = "fp32", extra: list[str] | None = None, log_path: str | os.PathLike | None = None,
                 env: dict | None = None) -> subprocess.Popen:
    """``rpnt serve`` in a child process (its own interpreter and GIL).  Wait for it with
    :func:`streaming.client.wait_for_daemon`; stop it with ``proc.send_signal(SIGINT)``."""
    cmd = [sys.executable, "-m", "streaming.cli", "serve", "--model", str(model), "--backend", backend,
           "--precision", precision, "--bin-ms", repr(float(bin_ms)), "--ingest", ingest, "--publish", publish,
           "--stats-interval", "0", *(extra or [])]
    out = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
    root = Path(__file__).resolve().parents[1]
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = os.pathsep.join([str(root)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=e, cwd=str(root))
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
