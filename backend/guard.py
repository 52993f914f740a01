"""What every request passes before the app reads its body: the admin token, and a bound
on the body's size.

FastAPI reads and parses a request's body before it runs the route's dependencies, the
token check among them: an unauthenticated 100 MB POST was read into memory before its
401. This pure ASGI middleware answers 401 from the headers alone, and counts the body's
bytes as they stream in (chunked bodies have no Content-Length to trust), answering 413
past MAX_REQUEST_BODY_BYTES. The routes keep their own token check as well.
"""

from __future__ import annotations

import contextlib

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.config import get_settings
from backend.deps import Unauthorized, check_metrics_token, check_token

# Monitoring answers without a token (/metrics wants METRICS_TOKEN when it is set); so do
# the API docs when API_DOCS_PUBLIC says so.
OPEN_PATHS = frozenset({"/health", "/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class BodyTooLarge(Exception):
    """Raised into the app by `receive` once the body passes the limit."""


# Static files with no data in them: the console's page (which then sends the token the
# operator typed with each API call) and the Swagger UI / ReDoc assets.
STATIC_PREFIXES = ("/ui/", "/docs-static/")


def is_open(path: str) -> bool:
    return (
        path in OPEN_PATHS
        or path == "/ui"
        or path.startswith(STATIC_PREFIXES)
        or (path in DOCS_PATHS and get_settings().docs_public)
    )


class RequestGuard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        check = None if is_open(scope["path"]) else check_token
        if scope["path"] == "/metrics" and get_settings().metrics_token is not None:
            check = check_metrics_token
        if check is not None:
            try:
                check(headers.get("authorization"))
            except Unauthorized as exc:
                await _error(401, exc.name, exc.message, {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
                return
        limit = get_settings().max_request_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return

        received = 0
        exceeded = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Whatever the app made of the interrupted read (FastAPI: a 400) is dropped
            # for the 413 below.
            if exceeded and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, guarded_send)
        if exceeded and not started:
            await _too_large(limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return _error(
        413,
        "PayloadTooLarge",
        f"the request body is larger than {limit} bytes (MAX_REQUEST_BODY_BYTES)",
    )


def _error(
    status: int, name: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)
