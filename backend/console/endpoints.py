"""The web console at /ui/: a static page over the JSON API, with no build step.

The files hold no data and no secret, so they are served without the token; every call
the page makes goes to the JSON API with the token the operator typed in (kept in the
browser's sessionStorage only).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

# The page shows what mail senders wrote (subjects, names, folder names): should any of
# it ever reach the DOM as markup, the browser still runs no script but the console's own
# file, loads nothing from elsewhere, and no other site can frame the page (clickjacking)
# or learn its address from a Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _ConsoleFiles(StaticFiles):
    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_console(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse("/ui/", headers=SECURITY_HEADERS)

    app.mount("/ui", _ConsoleFiles(directory=STATIC, html=True), name="console")
