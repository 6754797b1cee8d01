"""Calibration intake: one ``POST /calibrate`` request → validated data in a started job.

:func:`submit_calibration` (what :meth:`service.control.ControlPlane.calibrate` runs) refuses a
second job while one runs, then stages the request's data in a registry staging directory:

- ``source="upload"``: the file is copied to disk (at most :func:`upload_limit_bytes`), then parsed
  and checked against the live model in a child process (:func:`service.upload_parse.parse_upload`;
  ``labels="refit"``: intention labels from the file's task streams); this process never loads it;
- ``source="recent"``: the daemon's recent decoded bins with the rig's kinematics
  (``seconds``, default ``calibration.default_seconds``), checked the same way; ``labels="refit"``
  says those kinematics are the rig's ReFIT intention labels.

Intention labels (``labels="refit"``, either source) are marked in the job, and the worker puts them
on the live head's scale before training (:func:`service.calibration_worker.intention_on_head_scale`).

It hands the canonical NPZ to :meth:`service.calibration.CalibrationManager.submit` and answers
the 202 body.  The staging directory is removed whatever happens.  Errors are typed, for the route
to map onto status codes: :class:`UploadTooLarge` (413), :class:`CalibrationInputError` (422),
:class:`CalibrationBusy` (409) and :class:`CalibrationRefused` (409: any other ``ValueError``
while staging or submitting, e.g. the live version has no checkpoint).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from .calibration import CalibrationBusy
from .upload_parse import ParseLimits, parse_upload
from .uploads import CalibrationInputError, check_session, recent_session, save_canonical, with_live_metadata

if TYPE_CHECKING:
    from .control import ControlPlane

COPY_CHUNK = 1 << 20  # bytes per read when the upload is copied to disk


class UploadTooLarge(Exception):
    """The uploaded file is larger than ``http.max_upload_mb`` (HTTP 413)."""


class CalibrationRefused(Exception):
    """The live model cannot be calibrated (HTTP 409), e.g. it has no checkpoint to finetune from."""


def upload_limit_bytes(settings: Any) -> int:
    """The largest request body and upload accepted: ``http.max_upload_mb`` of ``settings``."""
    return int(settings.http.max_upload_mb * (1 << 20))


@dataclass(frozen=True, kw_only=True)
class CalibrationRequest:
    """What ``POST /calibrate`` was sent (its form fields, already type-checked by the route).

    Args:
        file: the uploaded file's bytes (read once), or None.
        filename: the name the client gave the file (reported back, never used as a path).
        source: ``"upload"``, ``"recent"``, or None (``"upload"`` with a file, else ``"recent"``).
        seconds: with ``source="recent"``: seconds of history (None: ``calibration.default_seconds``).
        force: go live even if the candidate's holdout R² is below the live model's.
        labels: ``"recorded"`` (the file's target series, or the rig's kinematics as they are) or
            ``"refit"`` (with an upload: intention labels from the file's task streams; with
            ``source="recent"``: the rig's kinematics are ReFIT intention labels).
    """

    file: BinaryIO | None = None
    filename: str | None = None
    source: Literal["upload", "recent"] | None = None
    seconds: float | None = None
    force: bool = False
    labels: Literal["recorded", "refit"] = "recorded"

    @property
    def resolved_source(self) -> Literal["upload", "recent"]:
        return self.source or ("upload" if self.file is not None else "recent")


@dataclass(frozen=True)
class _Staged:
    """Calibration data written as canonical NPZ, with what the job record says about it."""

    n_bins: int
    detail: dict


def live_checks(control: ControlPlane) -> dict:
    """The keyword arguments of :func:`service.uploads.check_session` for the live model."""
    daemon, cal = control.daemon, control.settings.calibration
    return {
        "target": control.live_target(),
        "n_channels": daemon.n_channels,
        "n_outputs": daemon.n_kinematics,
        "bin_s": daemon.bin_s,
        "min_bins": cal.min_bins,
        "holdout_fraction": cal.holdout_fraction,
    }


def submit_calibration(control: ControlPlane, request: CalibrationRequest) -> dict:
    """Stage ``request``'s data and start a calibration job on it (see the module docstring).

    Returns:
        the 202 body: ``job_id``, ``status_url``, ``source``, ``n_bins``, ``base_version``.
    """
    src = request.resolved_source
    running = control.calibration.busy()
    if running:
        raise CalibrationBusy(running)
    checks = live_checks(control)
    staging = control.registry.new_staging("upload")
    try:
        data = staging / "data.npz"
        t_arrived = time.perf_counter()  # the body has been received (FastAPI spools it before the route)
        if src == "upload":
            staged = _stage_upload(control, request, staging=staging, out=data, checks=checks)
        else:
            staged = _stage_recent(control, request, out=data, checks=checks)
        job_id = control.calibration.submit(
            data=data,
            source=src,
            force=request.force,
            base_version=control.live_version,
            n_bins=staged.n_bins,
            detail=staged.detail,
            timings={"input_s": round(time.perf_counter() - t_arrived, 3)},
        )
    except CalibrationInputError:
        raise
    except ValueError as exc:  # e.g. the live version has no checkpoint
        raise CalibrationRefused(str(exc)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "job_id": job_id,
        "status_url": f"/calibrate/{job_id}",
        "source": src,
        "n_bins": staged.n_bins,
        "base_version": control.live_version,
    }


def _stage_upload(
    control: ControlPlane, request: CalibrationRequest, *, staging: Path, out: Path, checks: dict
) -> _Staged:
    """The uploaded file, copied to ``staging`` and parsed in a child process into ``out``."""
    if request.file is None:
        raise CalibrationInputError("file: source=upload needs a file (multipart field 'file')")
    settings = control.settings
    max_bytes = upload_limit_bytes(settings)
    raw = staging / "upload.bin"
    with open(raw, "wb") as f:
        shutil.copyfileobj(request.file, f, COPY_CHUNK)
    size = raw.stat().st_size
    if size > max_bytes:
        raise UploadTooLarge(f"the file exceeds {max_bytes} bytes (http.max_upload_mb)")
    summary = parse_upload(
        raw,
        out=out,
        bin_s=control.daemon.bin_s,
        checks=checks,
        live_metadata=control.live_metadata(),
        limits=ParseLimits.from_settings(settings),
        labels=request.labels,
    )
    detail = {
        "filename": request.filename,
        "bytes": size,
        **({"labels": request.labels} if request.labels != "recorded" else {}),
    }
    return _Staged(summary["n_bins"], detail)


def _stage_recent(control: ControlPlane, request: CalibrationRequest, *, out: Path, checks: dict) -> _Staged:
    """The daemon's recent bins with the rig's kinematics, checked and written to ``out``."""
    if request.file is not None:
        raise CalibrationInputError("file: source=recent takes no file")
    if request.labels == "refit" and checks["target"] != "velocity":
        raise CalibrationInputError(
            f"labels: refit labels are velocities, and the live model decodes {checks['target']!r}"
        )
    secs = float(request.seconds or control.settings.calibration.default_seconds)
    counts, kinematics = control.recent_calibration_data(secs)
    bin_s = control.daemon.bin_s
    session = with_live_metadata(
        recent_session(counts, kinematics, bin_s=bin_s, target=checks["target"]), control.live_metadata()
    )
    session = check_session(session, **checks)
    save_canonical(session, out)
    detail = {"seconds": secs, **({"labels": request.labels} if request.labels != "recorded" else {})}
    return _Staged(session.n_bins, detail)
