"""The FastAPI admin API: routers, exception handlers, lifespan."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from backend import metrics
from backend.errors import MailbeatError
from backend.webhooks.endpoints import router as webhooks_router

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    metrics.multiproc_dir()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="mailbeat",
        version="0.1.0",
        description="Admin API for mailbeat, the IMAP ingestion service.",
        lifespan=lifespan,
    )
    app.include_router(metrics.router)

    @app.exception_handler(MailbeatError)
    async def _mailbeat_error(_request: Request, exc: MailbeatError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code, content={"error": exc.name, "detail": exc.message}
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

    app.include_router(webhooks_router)
    return app


app = create_app()
