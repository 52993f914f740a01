"""The web console at /ui/: a static page over the JSON API, with no build step.

The files hold no data and no secret, so they are served without the token; every call
the page makes goes to the JSON API with the token the operator typed in (kept in the
browser's sessionStorage only).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_console(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    def console_root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=STATIC, html=True), name="console")
