"""The FastAPI admin API: routers, exception handlers, lifespan."""

from __future__ import annotations

import logging
import re
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from backend import metrics, redaction
from backend.accounts.endpoints import router as accounts_router
from backend.admin.endpoints import health_router
from backend.admin.endpoints import router as admin_router
from backend.admin.service import HealthCache
from backend.audit import freshness
from backend.audit import service as audits
from backend.audit.endpoints import router as audit_router
from backend.config import get_settings
from backend.console.endpoints import mount_console
from backend.deps import KnownQueryDep
from backend.errors import MailbeatError, ValidationError, error_responses
from backend.guard import RequestGuard
from backend.mailbox.polling import prune_poll_runs, run_poll, sweep_dead_polls
from backend.messages.endpoints import router as messages_router
from backend.processing.endpoints import router as processing_router
from backend.processing.service import sweep
from backend.schedules import service as schedules
from backend.storage import tasks as storage_tasks
from backend.webhooks.endpoints import router as webhooks_router

log = logging.getLogger(__name__)
# uvicorn's access log writes each path with its query string (`?token=...`).
redaction.install(redaction.SERVER_LOGGERS)

# Swagger UI and ReDoc come from the fastapi-offline package, so /docs works offline.
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
DOCS_STATIC = "/docs-static"

DESCRIPTION = """Admin API for mailbeat, the IMAP ingestion service.

Every route but `/health` and `/metrics` needs `Authorization: Bearer $ADMIN_API_TOKEN`
(so do these docs unless API_DOCS_PUBLIC is on; it is off in production by default).
Request bodies are limited to MAX_REQUEST_BODY_BYTES (413).
Errors are `{"error": "<Name>", "detail": "..."}`; validation errors (422) also list each
problem in `errors`. Passwords and tokens are write-only: no response carries them.
"""


def local_housekeeping() -> None:
    """Beat's periodic work (beat_schedule in backend/celery_app.py), for local mode: pick
    up lost processing and deliveries, delete old poll runs, close the runs of polls
    that died with a previous process, announce mailboxes that turned stale or fresh,
    send the audits due, move objects that fell back to local files up to S3 once it
    answers, and remove the stored objects of deleted accounts. (Beat's reconcile is the
    local scheduler's own re-read.)"""
    sweep()
    prune_poll_runs()
    sweep_dead_polls()
    freshness.check()
    # Housekeeping runs once per refresh, not once a minute as beat sends it.
    audits.schedule_due(tick_seconds=get_settings().reconcile_interval_seconds)
    storage_tasks.purge_deleted()
    if get_settings().s3_enabled:
        storage_tasks.sync_all()


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    metrics.multiproc_dir()
    # Without Redis the API process runs the polls itself (local mode).
    if schedules.start_local_scheduler_if_needed(poll=run_poll, housekeeping=local_housekeeping):
        log.info("local mode: this process runs the in-process poll scheduler")
    try:
        yield
    finally:
        schedules.stop_local_scheduler()
        _keep_sigterm_pending()


def _keep_sigterm_pending() -> None:
    """uvicorn re-raises the SIGTERM that stopped it once its graceful shutdown is done, and
    SIGTERM's default action then ends the process as if killed: exit 143, which docker and
    compose show as a failure. Blocked now, at the end of shutdown, it stays pending and the
    process exits 0. Only uvicorn's main thread: a test client runs the lifespan elsewhere."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and what, without pydantic's `input` and `ctx`: the input may be a password."""
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]


def create_app() -> FastAPI:
    app = FastAPI(
        title="mailbeat",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(RequestGuard)
    app.state.health = HealthCache()
    app.state.metrics = metrics.StateCache()
    _serve_docs(app)
    app.include_router(accounts_router)
    app.include_router(audit_router)
    app.include_router(messages_router)
    app.include_router(admin_router)
    app.include_router(health_router)
    # These routers answer in our error shapes too; documented here for all their routes.
    for router, statuses in (
        (webhooks_router, (401, 404)),
        (processing_router, (400, 401, 404, 409, 502, 503)),
    ):
        app.include_router(
            router, dependencies=[KnownQueryDep], responses=error_responses(*statuses)
        )
    app.include_router(metrics.router)
    mount_console(app)

    @app.exception_handler(MailbeatError)
    async def _mailbeat_error(_request: Request, exc: MailbeatError) -> JSONResponse:
        content: dict[str, Any] = {"error": exc.name, "detail": exc.message}
        if exc.status_code == 422:
            # Every 422 has the shape of the schema's own validation errors.
            loc = list(exc.loc) if isinstance(exc, ValidationError) else ["body"]
            content["errors"] = [{"loc": loc, "msg": exc.message, "type": "value_error"}]
        return JSONResponse(
            status_code=exc.status_code,
            content=content,
            headers={"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (404 unknown path, 405 method) in the same shape as ours.
        names = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists the methods of the first route that matched the path only.
            headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return JSONResponse(
            status_code=exc.status_code,
            content={"error": names.get(exc.status_code, "HTTPError"), "detail": str(exc.detail)},
            headers=headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # PATCH /accounts/test reaches PATCH /accounts/{account_id} and fails on the id;
        # the literal path is its own resource, which has no PATCH.
        literal = app.openapi().get("paths", {}).get(request.url.path)
        if literal is not None and request.method.lower() not in literal:
            return await _http_error(request, StarletteHTTPException(405))
        errors = _validation_errors(exc)
        detail = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'] if part != 'body') or 'body'}: {e['msg']}"
            for e in errors
        )
        return JSONResponse(
            status_code=422,
            content={"error": "ValidationError", "detail": detail, "errors": errors},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex
        log.exception(
            "unhandled error on %s %s [request %s]", request.method, request.url.path, request_id
        )
        return JSONResponse(
            status_code=500,
            content={
                "error": "InternalError",
                "detail": f"an unexpected error occurred; see the logs for request {request_id}",
            },
        )

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        return _with_interval_bounds(default_openapi())

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _serve_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc, from files this package installs (the
    defaults load them from a CDN, so the pages were blank offline)."""
    app.mount(DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-static")
    favicon = f"{DOCS_STATIC}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=favicon,
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )


def _with_interval_bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """The poll interval's bounds are settings, so they are written into the schema when
    it is served rather than fixed in the models at import."""
    settings = get_settings()
    components = schema.get("components", {}).get("schemas", {})
    for name in ("AccountCreate", "AccountUpdate"):
        field = components.get(name, {}).get("properties", {}).get("poll_interval_seconds", {})
        for option in field.get("anyOf", [field]):
            if option.get("type") == "integer":
                option["minimum"] = settings.min_poll_interval_seconds
                option["maximum"] = settings.max_poll_interval_seconds
    return schema


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the schema lists for this path. A literal path (/admin/celery/tasks/sync)
    is its own resource even where a template (/admin/celery/tasks/{task_id}) matches too."""
    paths: dict[str, dict[str, Any]] = app.openapi().get("paths", {})
    if path in paths:
        return sorted(method.upper() for method in paths[path])
    methods: set[str] = set()
    for template, operations in paths.items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods.update(method.upper() for method in operations)
    return sorted(methods)


app = create_app()
