"""The processes a calibration job runs in (the parent's handles; the worker's own code is
:mod:`service.calibration_worker`): a cold worker, one process per job, or a warm worker started
before its jobs that runs them one after another."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

from rpnt_core.child_env import ROOT

from .settings import CalibrationSettings


class ColdWorker:
    """``python -m service.calibration_worker JOB``: one process for one job."""

    def __init__(self, *, job: Path, env: dict) -> None:
        with open(job / "worker.log", "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.calibration_worker", str(job)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
                stdin=subprocess.DEVNULL,
            )

    def wait_job(self, timeout: float) -> int | None:
        """The job's exit status (the process's), or None while it runs."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def reusable(self) -> bool:
        return False


class WarmWorker:
    """A calibration worker process started before its jobs (``python -m service.calibration_worker
    --serve OPTIONS``), running them one after another (the protocol: that module's docstring).

    Args:
        options: the calibration settings it confines itself by (threads, niceness, CPUs).
        env: its environment.
        log: where its output goes between jobs (during a job: the job's ``worker.log``).
    """

    def __init__(self, *, options: CalibrationSettings, env: dict, log: Path) -> None:
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.calibration_worker", "--serve", options.model_dump_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                env=env,
                cwd=str(ROOT),
            )
        self._buf = b""
        self.ready = False  # it has imported what jobs need

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, job: Path) -> None:
        """Hand it ``job`` (it runs it once its imports are done)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{job}\n".encode())
        self.proc.stdin.flush()

    def wait_job(self, timeout: float) -> int | None:
        """The job's status (``done RC``), the process's exit status if it died, or None while it runs."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line == b"ready":
                    self.ready = True
                elif line.startswith(b"done "):
                    return int(line.split()[1])
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # it died (a crash, or killed): its exit status, never 0
                rc = self.proc.wait()
                return rc if rc != 0 else 1
            self._buf += chunk

    def reusable(self) -> bool:
        return self.alive()

    def close(self, timeout: float = 5.0) -> None:
        """Let it exit (end of its stdin), killing it if it does not within ``timeout``."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
