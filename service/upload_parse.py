"""An uploaded calibration file is parsed in a short-lived child process, never in ``rpnt serve``.

The daemon's decode thread lives in the ``rpnt serve`` process, so a hostile or broken upload (a
zip bomb, an HDF5 file whose datasets declare terabytes, a parser that hangs) must not cost that
process memory or time.  :func:`parse_upload` (the parent side) runs::

    python -m service.upload_parse SPEC.json

which caps its own address space (``RLIMIT_AS``) and CPU time (``RLIMIT_CPU``) and takes the
calibration process's niceness and CPUs before it opens the upload (it never imports torch).
It reads the upload (:func:`service.uploads.load_upload`: every declared size checked
against ``http.max_decompressed_mb`` before anything is inflated), checks it against the live
model (:func:`service.uploads.check_session`), writes the validated session as canonical NPZ and
a small JSON summary, and exits.  The parent waits at most ``http.upload_parse_timeout_s`` (then
kills it), reads only the summary, and hands the NPZ to the calibration worker: it never loads
the upload's arrays itself.  Every failure becomes one :class:`CalibrationInputError` line (HTTP
422); what the child printed goes to the server log, never into the answer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rpnt_core.child_env import ROOT, child_env
from rpnt_core.data.formats import describe_bytes

from .uploads import CalibrationInputError

log = logging.getLogger("rpnt.uploads")

# The child's address space: the interpreter with numpy, h5py and pynwb loaded (about 250 MB of
# address space) with room to spare, plus three times the data limit (the arrays as uploaded, their
# validated copies and the canonical NPZ's compaction).
BASE_ADDRESS_SPACE = 1 << 30
DATA_COPIES = 3
SPEC, RESULT, LOG = "parse.json", "parse-result.json", "parse.log"


@dataclass(frozen=True, kw_only=True)
class ParseLimits:
    """What one parse may use: ``max_bytes`` of uncompressed data, ``memory_bytes`` of address
    space, ``timeout_s`` of wall time; it runs at ``nice`` on ``affinity`` (``None``: any CPU)."""

    max_bytes: int
    memory_bytes: int
    timeout_s: float
    nice: int = 0
    affinity: tuple[int, ...] | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> "ParseLimits":
        """From :class:`~service.settings.Settings`: the data limit and timeout of ``http``, the
        niceness and CPUs of ``calibration`` (the parse is the calibration's first step)."""
        max_bytes = int(settings.http.max_decompressed_mb * (1 << 20))
        cal = settings.calibration
        return cls(
            max_bytes=max_bytes,
            memory_bytes=BASE_ADDRESS_SPACE + DATA_COPIES * max_bytes,
            timeout_s=float(settings.http.upload_parse_timeout_s),
            nice=int(cal.nice),
            affinity=tuple(cal.affinity) if cal.affinity else None,
        )


# ---------------------------------------------------------------------------------- parent side
def parse_upload(
    upload: Path,
    *,
    out: Path,
    bin_s: float,
    checks: dict,
    live_metadata: dict,
    limits: ParseLimits,
    labels: str = "recorded",
) -> dict:
    """Parse ``upload`` in a child process into the validated canonical NPZ ``out``.

    ``checks``: the keyword arguments of :func:`service.uploads.check_session` (the live model's
    channels, outputs, bin width …); ``live_metadata``: what the session inherits when it names
    none (:func:`service.uploads.with_live_metadata`); ``labels="refit"``: the labels are made from
    the file's task streams by the ReFIT rule (:func:`streaming.closedloop.refit.intention_session`).  Returns the summary (``n_bins``,
    ``n_channels``, ``n_outputs``); raises :class:`CalibrationInputError` for anything else.
    The child's files (spec, result, log) go next to ``upload`` and are removed."""
    work = upload.parent
    spec = {
        "upload": upload.name,
        "out": str(out),
        "bin_s": bin_s,
        "checks": checks,
        "live_metadata": live_metadata,
        "limits": asdict(limits),
        "labels": labels,
    }
    (work / SPEC).write_text(json.dumps(spec))
    try:
        rc = _run_child(work, limits.timeout_s)
        result = _read_json(work / RESULT)
        if rc == 0 and isinstance(result, dict) and isinstance(result.get("summary"), dict):
            return result["summary"]
        if isinstance(result, dict) and isinstance(result.get("error"), str):
            raise CalibrationInputError(result["error"])
        _log_child(work, rc)
        raise CalibrationInputError(
            f"file: the parser stopped without an answer (it may use "
            f"{describe_bytes(limits.memory_bytes)} of memory); the server log has details"
        )
    except subprocess.TimeoutExpired:
        _log_child(work, None)
        raise CalibrationInputError(
            f"file: parsing the upload took longer than {limits.timeout_s:g} s (http.upload_parse_timeout_s)"
        ) from None
    finally:
        for name in (SPEC, RESULT, LOG):
            (work / name).unlink(missing_ok=True)


def _run_child(work: Path, timeout_s: float) -> int:
    """Run the child on ``work``; its exit status (``subprocess.run`` kills it on timeout)."""
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    with open(work / LOG, "wb") as logf:
        return subprocess.run(
            [sys.executable, "-m", "service.upload_parse", str(work / SPEC)],
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
        ).returncode


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _log_child(work: Path, rc: int | None) -> None:
    """The child's output, for the operator (the answer never carries it)."""
    try:
        tail = (work / LOG).read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        tail = ""
    log.warning("upload parse %s; its output:\n%s", "timed out" if rc is None else f"exited {rc}", tail)


# ---------------------------------------------------------------------------------- child side
def _confine(limits: dict) -> None:
    """Cap this process before it touches the upload: address space, CPU seconds, niceness, CPUs."""
    import resource

    mem = int(limits["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    cpu = max(1, int(limits["timeout_s"]) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if int(limits.get("nice") or 0) > 0:
        os.nice(int(limits["nice"]))
    if limits.get("affinity") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in limits["affinity"]})


def _parse(spec: dict, work: Path) -> dict:
    """The child's work: load, inherit metadata, check, write the canonical NPZ; the summary."""
    from .uploads import check_session, intention_labels, load_upload, save_canonical, with_live_metadata

    session = load_upload(
        work / spec["upload"], bin_s=float(spec["bin_s"]), max_bytes=int(spec["limits"]["max_bytes"])
    )
    if spec.get("labels") == "refit":
        session = intention_labels(session)
    session = with_live_metadata(session, spec["live_metadata"])
    session = check_session(session, **spec["checks"])
    save_canonical(session, Path(spec["out"]))
    return {
        "n_bins": session.n_bins,
        "n_channels": session.n_channels,
        "target": session.target,
        "n_outputs": int(session.labels.shape[1]),
    }


def main(argv: list[str]) -> int:
    """``python -m service.upload_parse SPEC.json``: writes ``parse-result.json`` beside the spec
    (``{"summary": …}`` or ``{"error": "field: …"}``) and exits 0; 1 on an unexpected failure."""
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    _confine(spec["limits"])
    work = spec_path.parent
    try:
        result: dict = {"summary": _parse(spec, work)}
    except CalibrationInputError as exc:
        result = {"error": str(exc)}
    except MemoryError:
        result = {
            "error": f"file: the upload needs more memory than the parser may use "
            f"({describe_bytes(int(spec['limits']['memory_bytes']))})"
        }
    tmp = work / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, work / RESULT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
