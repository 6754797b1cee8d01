"""The HTTP control plane (FastAPI): routes onto :class:`~service.control.ControlPlane`.

=====================================  =====  ====================================================
route                                  auth   answer
=====================================  =====  ====================================================
``GET /health``                               200 while the process serves HTTP (liveness)
``GET /ready``                                200 once a model is loaded and warmed up, else 503
``GET /status``                               model version + fingerprint, channels, bin width,
                                              uptime, streaming counters and latency
``GET /metrics``                              Prometheus text format (``service.metrics``)
``POST /calibrate``                    yes    202 + job id; multipart form: ``file`` (NPZ/NWB) or
                                              ``source=recent`` (+ ``seconds``), ``force``
``GET /calibrate``                            the jobs, oldest first
``GET /calibrate/{job_id}``                   state, phase, per-epoch losses, holdout R², swap,
                                              CPU share (phase ``waiting for CPU`` while starved),
                                              ``timings`` (seconds per phase)
``DELETE /calibrate/{job_id}``         yes    cancel the running job (it ends ``failed``); 409 if
                                              it is not running
``GET /models``                               every registry version, which one is active
``POST /models/{version}/activate``    yes    swap that version in at a bin boundary (rollback)
=====================================  =====  ====================================================

Errors are JSON ``{"detail": "..."}`` saying what is wrong: 401 no bearer token, 403 wrong token,
404 unknown job/version, 409 a calibration already runs / a version that does not fit the stream,
411/413 a body without length / too large, 422 unusable input (wrong channel count, too short,
NaN, corrupt or unknown file …).  A 4xx never changes the live model.  All handlers are plain
(threaded) functions that only read daemon snapshots or hand work to the calibration process, so
nothing here runs on the decode loop's thread.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import time
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .calibration import CalibrationBusy
from .control import ActivationError, ControlPlane
from .registry import RegistryError
from .upload_parse import ParseLimits, parse_upload
from .uploads import CalibrationInputError, check_session, recent_session, save_canonical, with_live_metadata

log = logging.getLogger("rpnt.http")
_bearer = HTTPBearer(auto_error=False, description="the API token (RPNT_API_TOKEN / auth.token_file)")


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` (413) or, for a POST/PUT without a
    Content-Length, refuse it (411) — before anything reads it."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, detail = None, ""
            if length is None:
                if headers.get(b"transfer-encoding"):
                    status, detail = 411, "a request body needs a Content-Length"
            else:
                try:
                    n = int(length)
                except ValueError:
                    n = -1
                if n < 0:
                    status, detail = 400, "Content-Length is not a number"
                elif n > self.max_bytes:
                    status, detail = 413, (f"the body is {n} bytes; the limit is {self.max_bytes} bytes "
                                           "(http.max_upload_mb)")
            if status is not None:
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(control: ControlPlane, *, token: str) -> FastAPI:
    """The FastAPI application for ``control``; mutating routes need ``Authorization: Bearer <token>``."""
    settings = control.settings
    max_bytes = int(settings.http.max_upload_mb * (1 << 20))
    parse_limits = ParseLimits.from_settings(settings)
    app = FastAPI(title="rpnt control plane", version="1", description=__doc__.split("\n\n")[0],
                  openapi_tags=[{"name": "health"}, {"name": "calibration"}, {"name": "models"}])
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    def require_token(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(401, "this endpoint needs 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong API token")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # the exception's text can hold server paths: it goes to the log, not to the client
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
                            status_code=500)

    # -------------------------------------------------------------- health
    @app.get("/health", tags=["health"])
    def health() -> dict:
        return {"status": "alive"}

    @app.get("/ready", tags=["health"], responses={503: {"description": "not ready"}})
    def ready():
        ok, detail = control.ready()
        return JSONResponse({"ready": ok, "detail": detail}, status_code=200 if ok else 503)

    @app.get("/status", tags=["health"])
    def status() -> dict:
        return control.status()

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(control.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -------------------------------------------------------------- calibration
    @app.post("/calibrate", tags=["calibration"], status_code=202, dependencies=[Depends(require_token)],
              responses={401: {}, 403: {}, 409: {}, 411: {}, 413: {}, 422: {}})
    def calibrate(file: Annotated[UploadFile | None, File(description="labelled session: NPZ or NWB")] = None,
                  source: Annotated[Literal["upload", "recent"] | None, Form(
                      description="'upload' (the file) or 'recent' (the daemon's own recent bins with the "
                                  "rig's kinematics); default: 'upload' with a file, else 'recent'")] = None,
                  seconds: Annotated[float | None, Form(gt=0, le=86400, description="with source=recent: seconds "
                                                                                    "of history")] = None,
                  force: Annotated[bool, Form(description="go live even if the holdout R² is below the live "
                                                          "model's")] = False) -> dict:
        src = source or ("upload" if file is not None else "recent")
        running = control.calibration.busy()
        if running:
            raise HTTPException(409, str(CalibrationBusy(running)))
        daemon = control.daemon
        cal = settings.calibration
        reg = control.registry
        staging = reg.new_staging("upload")
        checks = {"target": control.live_target(), "n_channels": daemon.n_channels,
                  "n_outputs": daemon.n_kinematics, "bin_s": daemon.bin_s,
                  "min_bins": cal.min_bins, "holdout_fraction": cal.holdout_fraction}
        data = staging / "data.npz"
        t_arrived = time.perf_counter()  # the body has been received (FastAPI spools it before the handler)
        try:
            if src == "upload":
                if file is None:
                    raise CalibrationInputError("file: source=upload needs a file (multipart field 'file')")
                raw = staging / "upload.bin"
                with open(raw, "wb") as f:
                    shutil.copyfileobj(file.file, f, 1 << 20)
                size = raw.stat().st_size
                if size > max_bytes:
                    raise HTTPException(413, f"the file exceeds {max_bytes} bytes (http.max_upload_mb)")
                # parsed and checked in a child process: this one (the decode thread's) never loads it
                n_bins = parse_upload(raw, out=data, bin_s=daemon.bin_s, checks=checks,
                                      live_metadata=control.live_metadata(), limits=parse_limits)["n_bins"]
                detail = {"filename": file.filename, "bytes": size}
            else:
                if file is not None:
                    raise CalibrationInputError("file: source=recent takes no file")
                secs = float(seconds or cal.default_seconds)
                counts, kinematics = control.recent_calibration_data(secs)
                session = with_live_metadata(recent_session(counts, kinematics, bin_s=daemon.bin_s,
                                                            target=checks["target"]), control.live_metadata())
                session = check_session(session, **checks)
                save_canonical(session, data)
                n_bins, detail = session.n_bins, {"seconds": secs}
            job_id = control.calibration.submit(data=data, source=src, force=force, base_version=control.live_version,
                                                n_bins=n_bins, detail=detail,
                                                timings={"input_s": round(time.perf_counter() - t_arrived, 3)})
        except CalibrationInputError as exc:
            raise HTTPException(422, str(exc)) from None
        except CalibrationBusy as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:  # e.g. the live version has no checkpoint
            raise HTTPException(409, str(exc)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"job_id": job_id, "status_url": f"/calibrate/{job_id}", "source": src, "n_bins": n_bins,
                "base_version": control.live_version}

    @app.get("/calibrate", tags=["calibration"])
    def calibration_jobs() -> dict:
        return {"running": control.calibration.busy(), "jobs": control.calibration.jobs()}

    @app.get("/calibrate/{job_id}", tags=["calibration"], responses={404: {}})
    def calibration_job(job_id: str) -> dict:
        st = control.calibration.get(job_id)
        if st is None:
            raise HTTPException(404, f"no calibration job {job_id!r}")
        return st

    @app.delete("/calibrate/{job_id}", tags=["calibration"], dependencies=[Depends(require_token)],
                responses={401: {}, 403: {}, 404: {}, 409: {}})
    def cancel_calibration_job(job_id: str) -> dict:
        st = control.calibration.get(job_id)
        if st is None:
            raise HTTPException(404, f"no calibration job {job_id!r}")
        if not control.calibration.cancel(job_id, f"DELETE /calibrate/{job_id}"):
            raise HTTPException(409, f"calibration job {job_id} is not running (state: {st['state']})")
        control.calibration.wait_idle(30.0)
        return control.calibration.get(job_id)

    # -------------------------------------------------------------- models
    @app.get("/models", tags=["models"])
    def models() -> dict:
        return {"active": control.live_version, "versions": control.registry.listing()}

    @app.post("/models/{version}/activate", tags=["models"], dependencies=[Depends(require_token)],
              responses={401: {}, 403: {}, 404: {}, 409: {}})
    def activate(version: str) -> dict:
        try:
            return control.activate(version, f"POST /models/{version}/activate")
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        except ActivationError as exc:
            raise HTTPException(409, str(exc)) from None

    return app
