"""The model registry: every model version the daemon has run or could run, on disk.

Layout under ``root``::

    versions/<N>/export/          the ONNX export (rpnt export --out): what the daemon runs
    versions/<N>/checkpoint.safetensors   the torch checkpoint (what calibration finetunes from)
    versions/<N>/meta.json        source (seed | calibration | import), parent, metrics, created, ...
    active.json                   {"version": N, "history": [...]}  — which one is live
    jobs/<id>/                    calibration jobs (see service.calibration)
    staging/                      half-built versions; emptied when the registry opens

Versions are whole numbers, 1, 2, 3 …, never reused and never deleted.  A version appears in
``versions/`` by one ``rename`` of a complete directory, and ``active.json`` is replaced by
``os.replace`` of a fsynced temporary file, so a crash at any moment leaves either the old or the
new state, never a half-written one.  After a restart the daemon comes back on the active version
— or, if that one no longer loads, on the most recent earlier active one that does
(:meth:`ModelRegistry.candidates_for_start`).

The registry owns these files; nothing else writes them.  Thread-safe within one process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rpnt_core.child_env import ROOT, child_env

STEP_FILE = "rpnt_step.onnx"  # = exporters.contract.STEP_FILE (not imported: keeps onnx off this path)
CHECKPOINT = "checkpoint.safetensors"


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, bad import, ...)."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (files this package writes
    are replaced atomically, so an unreadable one was damaged from outside: treated as absent)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return default


def export_checkpoint_subprocess(
    checkpoint: Path,
    out_dir: Path,
    *,
    parity_data: Path | None = None,
    timeout_s: float = 900.0,
    env: dict | None = None,
) -> None:
    """``rpnt export CKPT --out DIR`` in a child process (keeps torch out of the daemon's process).
    Raises :class:`RegistryError` with the exporter's own message if it fails (parity included)."""
    cmd = [sys.executable, "-m", "exporters.cli", str(checkpoint), "--out", str(out_dir)]
    if parity_data is not None:
        cmd += ["--parity-data", str(parity_data)]
    e = child_env(env)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=e, cwd=str(ROOT))
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        raise RegistryError(f"export of {checkpoint} failed (exit {r.returncode}): " + " | ".join(tail))


def holds_versions(root: str | os.PathLike) -> bool:
    """Whether a registry at ``root`` holds any version.  Only reads: creates nothing (for the
    start-up checks that run before the registry is opened)."""
    d = Path(root) / "versions"
    return d.is_dir() and any(p.is_dir() and p.name.isdigit() for p in d.iterdir())


class ModelRegistry:
    """See the module docstring.  ``root`` is created if missing."""

    def __init__(self, *, root: str | os.PathLike) -> None:
        # absolute: job and version paths are handed to child processes that run in another directory
        self.root = Path(root).resolve()
        self.versions_dir = self.root / "versions"
        self.jobs_dir = self.root / "jobs"
        self.staging_dir = self.root / "staging"
        for d in (self.versions_dir, self.jobs_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.staging_dir.iterdir():  # half-built versions of a crashed process
            shutil.rmtree(leftover, ignore_errors=True)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[str]:
        """All version ids, oldest first."""
        ids = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(ids, key=int)

    def meta(self, version: str) -> dict:
        """The version's ``meta.json`` with its ``version``; :class:`RegistryError` if it is unknown."""
        d = self._dir(version)
        return read_json(d / "meta.json", {}) | {"version": str(version)}

    def export_dir(self, version: str) -> Path:
        """The version's export directory; :class:`RegistryError` if it is unknown."""
        return self._dir(version) / "export"

    def checkpoint(self, version: str) -> Path | None:
        """The version's checkpoint, or None when it has none (an export-only import)."""
        p = self._dir(version) / CHECKPOINT
        return p if p.exists() else None

    def active(self) -> str | None:
        """The active version, or None (a new registry, or one whose active version is gone)."""
        a = read_json(self.root / "active.json", {}) or {}
        v = a.get("version")
        return str(v) if v is not None and (self.versions_dir / str(v)).is_dir() else None

    def activation_history(self) -> list[dict]:
        """The recorded activations (the last 1000: ``version``, ``time``, ``reason``), oldest first."""
        return list((read_json(self.root / "active.json", {}) or {}).get("history", []))

    def candidates_for_start(self) -> list[str]:
        """Versions to try at start-up, best first: the active one, then earlier active ones (most
        recent first).  Empty for a new registry."""
        seen: list[str] = []
        act = self.active()
        if act:
            seen.append(act)
        for rec in reversed(self.activation_history()):
            v = str(rec.get("version"))
            if v not in seen and (self.versions_dir / v).is_dir():
                seen.append(v)
        return seen

    def listing(self) -> list[dict]:
        """Every version's metadata with ``active`` and ``has_checkpoint``, oldest first."""
        act = self.active()
        return [
            self.meta(v) | {"active": v == act, "has_checkpoint": self.checkpoint(v) is not None}
            for v in self.versions()
        ]

    def _dir(self, version: str) -> Path:
        v = str(version)
        d = self.versions_dir / v
        if not v.isdigit() or not d.is_dir():
            raise RegistryError(f"no model version {v!r} (versions: {', '.join(self.versions()) or 'none'})")
        return d

    # ------------------------------------------------------------------ writing
    def new_staging(self, name: str) -> Path:
        """A new, empty directory under ``staging/`` (``name``-pid-clock): where a version is built or
        calibration data is staged."""
        d = self.staging_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
        d.mkdir(parents=True)
        return d

    def add(self, staged: Path, *, meta: dict) -> str:
        """Publish a staged directory (holding ``export/`` and optionally ``checkpoint.safetensors``)
        as the next version; returns its id.  The staged directory is moved, not copied."""
        staged = Path(staged)
        if not (staged / "export" / STEP_FILE).is_file():
            raise RegistryError(f"{staged}: no export/{STEP_FILE}")
        with self._lock:
            existing = self.versions()
            version = str(int(existing[-1]) + 1 if existing else 1)
            write_json_atomic(staged / "meta.json", {**meta, "version": version, "created": time.time()})
            os.rename(staged, self.versions_dir / version)
        return version

    def activate(self, version: str, *, reason: str) -> dict:
        """Record ``version`` as live (the caller has swapped the daemon to it)."""
        with self._lock:
            self._dir(version)
            a = read_json(self.root / "active.json", {}) or {}
            hist = list(a.get("history", []))
            rec = {"version": str(version), "time": time.time(), "reason": reason}
            hist.append(rec)
            write_json_atomic(self.root / "active.json", {"version": str(version), "history": hist[-1000:]})
            return rec

    def import_model(self, path: str | os.PathLike, *, source: str = "seed") -> str:
        """Register an export directory (with the source checkpoint, when its contract's path still
        exists) or a checkpoint (exported here, in a child process).  Returns the new version."""
        p = Path(path)
        if not p.exists():
            raise RegistryError(f"model: no such file or directory: {p}")
        staged = self.new_staging("import")
        try:
            if p.is_dir():
                if not (p / STEP_FILE).is_file():
                    raise RegistryError(f"model: {p} is a directory without {STEP_FILE} (not an rpnt export)")
                shutil.copytree(p, staged / "export", ignore=shutil.ignore_patterns("export-failed"))
                ckpt = _contract_checkpoint(p / STEP_FILE)
                if ckpt is not None and ckpt.is_file():
                    shutil.copy2(ckpt, staged / CHECKPOINT)
            elif p.suffix == ".safetensors":
                shutil.copy2(p, staged / CHECKPOINT)
                export_checkpoint_subprocess(staged / CHECKPOINT, staged / "export")
            else:
                raise RegistryError(
                    f"model: {p} is neither an export directory nor a .safetensors checkpoint"
                )
            return self.add(staged, meta={"source": source, "imported_from": str(p.resolve())})
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


def _contract_checkpoint(step_onnx: Path) -> Path | None:
    """The source checkpoint recorded in an export's contract (read through ONNX Runtime; no torch)."""
    from exporters.runtime import read_contract

    path = read_contract(step_onnx).checkpoint
    return Path(path) if path else None
