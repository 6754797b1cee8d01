"""``rpnt serve`` (the daemon and its HTTP control plane) as a child process, for whatever drives it
from outside: the closed-loop bench, ``rpnt demo`` and the service benchmarks.

It runs the command (``python -m rpnt_core.cli serve``) and never imports the service, so
``streaming`` stays below ``service`` in the layout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ServeProcess:
    """``rpnt serve`` as a child process: start it, wait for its ready line, stop it."""

    def __init__(
        self,
        *,
        model: Path,
        registry: Path,
        run_dir: Path,
        token: str,
        env: dict | None = None,
        extra: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.ingest, self.publish = f"ipc://{run_dir / 'ingest'}", f"ipc://{run_dir / 'publish'}"
        cmd = [
            sys.executable,
            "-m",
            "rpnt_core.cli",
            "serve",
            "--model",
            str(model),
            "--registry",
            str(registry),
            "--http-port",
            "0",
            "--ingest",
            self.ingest,
            "--publish",
            self.publish,
            "--stats-interval",
            "0",
            "--log-level",
            "warning",
            "--log-format",
            "json",
            *(extra or []),
        ]
        e = {**os.environ, "RPNT_API_TOKEN": token, "OMP_NUM_THREADS": "1", **(env or {})}
        self.log_path = run_dir / "serve.log"
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=e,
            cwd=cwd,
        )
        self.token = token
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready: dict = {}
        self.stopped: dict = {}

    def _read(self) -> None:
        assert self.proc.stderr is not None  # stderr=PIPE
        with open(self.log_path, "a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                self._lines.put(line)

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Its ``ready`` event (JSON on stderr); ``RuntimeError`` if it exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith('{"event": "ready"'):
                self.ready = json.loads(line)
                return self.ready
        raise RuntimeError(f"rpnt serve did not become ready (exit {self.proc.poll()}); see {self.log_path}")

    @property
    def url(self) -> str:
        return self.ready["http"]

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (then SIGKILL after ``timeout``); its exit status.  Its ``stopped`` event lands in
        ``self.stopped``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5.0)
        while not self._lines.empty():
            line = self._lines.get_nowait()
            if line.startswith('{"event": "stopped"'):
                self.stopped = json.loads(line)
        return int(self.proc.returncode)
