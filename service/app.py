"""The HTTP control plane (FastAPI): routes onto :class:`~service.control.ControlPlane`.

=====================================  =====  ====================================================
route                                  auth   answer
=====================================  =====  ====================================================
``GET /``                                     the live page (``service/static``; read-only)
``GET /events``                               server-sent events feeding it (``service.live``)
``GET /docs``                                 Swagger UI, every asset served from here (no CDN)
``GET /health``                               200 while the process serves HTTP (liveness)
``GET /ready``                                200 once a model is loaded and warmed up, else 503
``GET /status``                               model version + fingerprint, channels, bin width,
                                              uptime, streaming counters and latency
``GET /metrics``                              Prometheus text (OpenMetrics if asked; ``service.metrics``)
``POST /calibrate``                    yes    202 + job id; multipart form: ``file`` (NPZ/NWB) or
                                              ``source=recent`` (+ ``seconds``), ``force``,
                                              ``labels=refit`` (intention labels from task streams)
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
import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from .calibration import CalibrationBusy
from .control import ActivationError, ControlPlane
from .live import LIVE_HZ, PredictionFeed, SharedState, event_stream
from .registry import RegistryError
from .upload_parse import ParseLimits, parse_upload
from .uploads import CalibrationInputError, check_session, recent_session, save_canonical, with_live_metadata

log = logging.getLogger("rpnt.http")
_bearer = HTTPBearer(auto_error=False, description="the API token (RPNT_API_TOKEN / auth.token_file)")
STATIC = Path(__file__).parent / "static"  # the live page's HTML/JS/CSS (package data)
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")  # served from the swagger-ui-py package


def swagger_ui_dir() -> Path | None:
    """The ``static`` folder of the ``swagger-ui-py`` package (Swagger UI's own build, Apache-2.0,
    its licence beside it), found without importing the package; None if it is not installed."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "static"
    return d if all((d / name).is_file() for name in SWAGGER_ASSETS) else None


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
                    status, detail = (
                        413,
                        (f"the body is {n} bytes; the limit is {self.max_bytes} bytes (http.max_upload_mb)"),
                    )
            if status is not None:
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(control: ControlPlane, *, token: str) -> FastAPI:
    """The FastAPI application for ``control``; mutating routes need ``Authorization: Bearer <token>``."""
    settings = control.settings
    max_bytes = int(settings.http.max_upload_mb * (1 << 20))
    parse_limits = ParseLimits.from_settings(settings)
    app = FastAPI(
        title="rpnt control plane",
        version="1",
        description=__doc__.split("\n\n")[0],
        openapi_tags=[{"name": "health"}, {"name": "calibration"}, {"name": "models"}],
        docs_url=None,
        redoc_url=None,
    )  # /docs below serves its assets itself; ReDoc would need a CDN
    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    feed = PredictionFeed(endpoint=lambda: control.daemon.endpoints["publish"])
    shared = SharedState(control, ttl=0.5 / LIVE_HZ)

    def require_token(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                "this endpoint needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong API token")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # the exception's text can hold server paths: it goes to the log, not to the client
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
            status_code=500,
        )

    # -------------------------------------------------------------- live page, docs
    @app.get("/", include_in_schema=False)
    def live_page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    # not in the OpenAPI schema: a stream that never ends is no operation a client generator (or a
    # schema fuzzer) can call and read to the end
    @app.get("/events", include_in_schema=False)
    def events() -> StreamingResponse:
        """Server-sent events for the live page (``service.live``).  Read-only; no token."""
        return StreamingResponse(
            event_stream(control, feed, shared),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_dir() is None:
            raise HTTPException(
                404, "the API docs need the swagger-ui-py package (pip install 'rpnt[serve]')"
            )
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} — API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        d = swagger_ui_dir()
        if d is None or name not in SWAGGER_ASSETS:
            raise HTTPException(404, "no such docs asset")
        return FileResponse(d / name)

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
    def metrics(request: Request) -> Response:
        body, content_type = control.metrics_exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    # -------------------------------------------------------------- calibration
    @app.post(
        "/calibrate",
        tags=["calibration"],
        status_code=202,
        dependencies=[Depends(require_token)],
        responses={401: {}, 403: {}, 409: {}, 411: {}, 413: {}, 422: {}},
    )
    def calibrate(
        file: Annotated[UploadFile | None, File(description="labelled session: NPZ or NWB")] = None,
        source: Annotated[
            Literal["upload", "recent"] | None,
            Form(
                description="'upload' (the file) or 'recent' (the daemon's own recent bins with the "
                "rig's kinematics); default: 'upload' with a file, else 'recent'"
            ),
        ] = None,
        seconds: Annotated[
            float | None, Form(gt=0, le=86400, description="with source=recent: seconds of history")
        ] = None,
        force: Annotated[
            bool, Form(description="go live even if the holdout R² is below the live model's")
        ] = False,
        labels: Annotated[
            Literal["recorded", "refit"],
            Form(
                description="with an upload: 'recorded' (the file's target series) or 'refit' (intention "
                "labels by the ReFIT rule from the file's task streams extra_task_decoded, "
                "extra_task_cursor, extra_task_target, extra_task_radius)"
            ),
        ] = "recorded",
    ) -> dict:
        src = source or ("upload" if file is not None else "recent")
        running = control.calibration.busy()
        if running:
            raise HTTPException(409, str(CalibrationBusy(running)))
        daemon = control.daemon
        cal = settings.calibration
        reg = control.registry
        staging = reg.new_staging("upload")
        checks = {
            "target": control.live_target(),
            "n_channels": daemon.n_channels,
            "n_outputs": daemon.n_kinematics,
            "bin_s": daemon.bin_s,
            "min_bins": cal.min_bins,
            "holdout_fraction": cal.holdout_fraction,
        }
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
                n_bins = parse_upload(
                    raw,
                    out=data,
                    bin_s=daemon.bin_s,
                    checks=checks,
                    live_metadata=control.live_metadata(),
                    limits=parse_limits,
                    labels=labels,
                )["n_bins"]
                detail = {
                    "filename": file.filename,
                    "bytes": size,
                    **({"labels": labels} if labels != "recorded" else {}),
                }
            else:
                if file is not None:
                    raise CalibrationInputError("file: source=recent takes no file")
                if labels != "recorded":
                    raise CalibrationInputError(
                        "labels: refit applies to uploads; with source=recent the rig "
                        "streams its ReFIT labels as KINEMATICS (rpnt closedloop does)"
                    )
                secs = float(seconds or cal.default_seconds)
                counts, kinematics = control.recent_calibration_data(secs)
                session = with_live_metadata(
                    recent_session(counts, kinematics, bin_s=daemon.bin_s, target=checks["target"]),
                    control.live_metadata(),
                )
                session = check_session(session, **checks)
                save_canonical(session, data)
                n_bins, detail = session.n_bins, {"seconds": secs}
            job_id = control.calibration.submit(
                data=data,
                source=src,
                force=force,
                base_version=control.live_version,
                n_bins=n_bins,
                detail=detail,
                timings={"input_s": round(time.perf_counter() - t_arrived, 3)},
            )
        except CalibrationInputError as exc:
            raise HTTPException(422, str(exc)) from None
        except CalibrationBusy as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:  # e.g. the live version has no checkpoint
            raise HTTPException(409, str(exc)) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {
            "job_id": job_id,
            "status_url": f"/calibrate/{job_id}",
            "source": src,
            "n_bins": n_bins,
            "base_version": control.live_version,
        }

    @app.get("/calibrate", tags=["calibration"])
    def calibration_jobs() -> dict:
        return {"running": control.calibration.busy(), "jobs": control.calibration.jobs()}

    @app.get("/calibrate/{job_id}", tags=["calibration"], responses={404: {}})
    def calibration_job(job_id: str) -> dict:
        st = control.calibration.get(job_id)
        if st is None:
            raise HTTPException(404, f"no calibration job {job_id!r}")
        return st

    @app.delete(
        "/calibrate/{job_id}",
        tags=["calibration"],
        dependencies=[Depends(require_token)],
        responses={401: {}, 403: {}, 404: {}, 409: {}},
    )
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

    @app.post(
        "/models/{version}/activate",
        tags=["models"],
        dependencies=[Depends(require_token)],
        responses={401: {}, 403: {}, 404: {}, 409: {}},
    )
    def activate(version: str) -> dict:
        try:
            return control.activate(version, f"POST /models/{version}/activate")
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        except ActivationError as exc:
            raise HTTPException(409, str(exc)) from None

    return app
