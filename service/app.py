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
NaN, corrupt or unknown file …).  A 4xx never changes the live model.  The routes only translate:
the work, and the typed errors they map onto these codes (:data:`CALIBRATE_ERRORS`,
:data:`ACTIVATE_ERRORS`), are :class:`~service.control.ControlPlane`'s.  All handlers are plain
(threaded) functions that only read daemon snapshots or hand work to the calibration process, so
nothing here runs on the decode loop's thread.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import logging
from pathlib import Path
from typing import Annotated, Callable, Iterator, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
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
from .intake import CalibrationRefused, CalibrationRequest, UploadTooLarge, upload_limit_bytes
from .live import LIVE_HZ, PredictionFeed, SharedState, event_stream
from .registry import RegistryError
from .uploads import CalibrationInputError

log = logging.getLogger("rpnt.http")
_bearer = HTTPBearer(auto_error=False, description="the API token (RPNT_API_TOKEN / auth.token_file)")
STATIC = Path(__file__).parent / "static"  # the live page's HTML/JS/CSS (package data)
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")  # served from the swagger-ui-py package

# The control plane's typed errors → status codes, the first match winning (the message is the detail).
ErrorStatuses = tuple[tuple[type[Exception], int], ...]
CALIBRATE_ERRORS: ErrorStatuses = (
    (UploadTooLarge, 413),
    (CalibrationInputError, 422),
    (CalibrationBusy, 409),
    (CalibrationRefused, 409),
)
ACTIVATE_ERRORS: ErrorStatuses = ((RegistryError, 404), (ActivationError, 409))


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
    app = FastAPI(
        title="rpnt control plane",
        version="1",
        description=__doc__.split("\n\n")[0],
        openapi_tags=[{"name": "health"}, {"name": "calibration"}, {"name": "models"}],
        docs_url=None,
        redoc_url=None,
    )  # /docs below serves its assets itself; ReDoc would need a CDN
    app.add_middleware(BodyLimit, max_bytes=upload_limit_bytes(control.settings))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(Exception, _unexpected)
    auth = [Depends(token_check(token))]
    app.include_router(live_page_routes(control))
    app.include_router(docs_routes(openapi_url=app.openapi_url, title=app.title))
    app.include_router(health_routes(control))
    app.include_router(calibration_routes(control, auth=auth))
    app.include_router(model_routes(control, auth=auth))
    return app


def token_check(token: str) -> Callable[..., None]:
    """The dependency of the mutating routes: 401 without a bearer token, 403 with another one."""

    def require_token(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if cred is None or cred.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                "this endpoint needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong API token")

    return require_token


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    # the exception's text can hold server paths: it goes to the log, not to the client
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
        status_code=500,
    )


@contextlib.contextmanager
def http_errors(statuses: ErrorStatuses) -> Iterator[None]:
    """Raise the control plane's typed errors as ``HTTPException(status, str(error))``: the first
    ``(type, status)`` of ``statuses`` the error is an instance of; any other error propagates."""
    try:
        yield
    except Exception as exc:
        status = next((code for kind, code in statuses if isinstance(exc, kind)), None)
        if status is None:
            raise
        raise HTTPException(status, str(exc)) from None


def live_page_routes(control: ControlPlane) -> APIRouter:
    """``GET /`` (the live page) and ``GET /events`` (the server-sent events feeding it)."""
    router = APIRouter()
    feed = PredictionFeed(endpoint=lambda: control.daemon.endpoints["publish"])
    shared = SharedState(control, ttl=0.5 / LIVE_HZ)

    @router.get("/", include_in_schema=False)
    def live_page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    # not in the OpenAPI schema: a stream that never ends is no operation a client generator (or a
    # schema fuzzer) can call and read to the end
    @router.get("/events", include_in_schema=False)
    def events() -> StreamingResponse:
        """Server-sent events for the live page (``service.live``).  Read-only; no token."""
        return StreamingResponse(
            event_stream(control, feed, shared),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return router


def docs_routes(*, openapi_url: str | None, title: str) -> APIRouter:
    """``GET /docs`` (Swagger UI for the schema at ``openapi_url``) and its assets, served from here."""
    router = APIRouter()

    @router.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger_ui_dir() is None:
            raise HTTPException(
                404, "the API docs need the swagger-ui-py package (pip install 'rpnt[serve]')"
            )
        return get_swagger_ui_html(
            openapi_url=openapi_url or "",
            title=f"{title} — API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )

    @router.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        d = swagger_ui_dir()
        if d is None or name not in SWAGGER_ASSETS:
            raise HTTPException(404, "no such docs asset")
        return FileResponse(d / name)

    return router


def health_routes(control: ControlPlane) -> APIRouter:
    """``GET /health``, ``/ready``, ``/status`` and ``/metrics``: read-only, no token."""
    router = APIRouter(tags=["health"])

    @router.get("/health")
    def health() -> dict:
        return {"status": "alive"}

    @router.get("/ready", responses={503: {"description": "not ready"}})
    def ready():
        ok, detail = control.ready()
        return JSONResponse({"ready": ok, "detail": detail}, status_code=200 if ok else 503)

    @router.get("/status")
    def status() -> dict:
        return control.status()

    @router.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> Response:
        body, content_type = control.metrics_exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return router


def _job_or_404(control: ControlPlane, job_id: str) -> dict:
    st = control.calibration.get(job_id)
    if st is None:
        raise HTTPException(404, f"no calibration job {job_id!r}")
    return st


def calibration_routes(control: ControlPlane, *, auth: list) -> APIRouter:
    """``POST /calibrate`` (``auth``), ``GET /calibrate``, ``GET`` and ``DELETE /calibrate/{job_id}``."""
    router = APIRouter(tags=["calibration"])

    @router.post(
        "/calibrate",
        status_code=202,
        dependencies=auth,
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
                description="'recorded' (the file's target series, or the rig's KINEMATICS as they are) "
                "or 'refit' (intention labels: with an upload, by the ReFIT rule from the file's task "
                "streams extra_task_decoded, extra_task_cursor, extra_task_target, extra_task_radius; "
                "with source=recent, the rig's KINEMATICS are its ReFIT labels); intention labels are "
                "put on the live head's scale before training"
            ),
        ] = "recorded",
    ) -> dict:
        request = CalibrationRequest(
            file=None if file is None else file.file,
            filename=None if file is None else file.filename,
            source=source,
            seconds=seconds,
            force=force,
            labels=labels,
        )
        with http_errors(CALIBRATE_ERRORS):
            return control.calibrate(request)

    @router.get("/calibrate")
    def calibration_jobs() -> dict:
        return {"running": control.calibration.busy(), "jobs": control.calibration.jobs()}

    @router.get("/calibrate/{job_id}", responses={404: {}})
    def calibration_job(job_id: str) -> dict:
        return _job_or_404(control, job_id)

    @router.delete("/calibrate/{job_id}", dependencies=auth, responses={401: {}, 403: {}, 404: {}, 409: {}})
    def cancel_calibration_job(job_id: str) -> dict:
        st = _job_or_404(control, job_id)
        if not control.calibration.cancel(job_id, f"DELETE /calibrate/{job_id}"):
            raise HTTPException(409, f"calibration job {job_id} is not running (state: {st['state']})")
        control.calibration.wait_idle(30.0)
        return _job_or_404(control, job_id)

    return router


def model_routes(control: ControlPlane, *, auth: list) -> APIRouter:
    """``GET /models`` and ``POST /models/{version}/activate`` (``auth``; the rollback)."""
    router = APIRouter(tags=["models"])

    @router.get("/models")
    def models() -> dict:
        return {"active": control.live_version, "versions": control.registry.listing()}

    @router.post(
        "/models/{version}/activate", dependencies=auth, responses={401: {}, 403: {}, 404: {}, 409: {}}
    )
    def activate(version: str) -> dict:
        with http_errors(ACTIVATE_ERRORS):
            return control.activate(version, f"POST /models/{version}/activate")

    return router
