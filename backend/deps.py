"""FastAPI dependencies: a database session per request and the admin token check."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from backend.config import get_settings
from backend.db import get_sessionmaker
from backend.errors import MailbeatError


class Unauthorized(MailbeatError):
    status_code = 401


def get_session() -> Iterator[Session]:
    """The endpoint is the request boundary: it commits; anything left is rolled back."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.rollback()
        session.close()


def require_admin_token(authorization: Annotated[str | None, Header()] = None) -> None:
    check_token(authorization)


def check_token(authorization: str | None) -> None:
    """Raises Unauthorized unless `authorization` is `Bearer <ADMIN_API_TOKEN>`."""
    _check_bearer(authorization, "admin token", "ADMIN_API_TOKEN", get_settings().admin_token())


def check_metrics_token(authorization: str | None) -> None:
    """/metrics when METRICS_TOKEN is set: that token (a scraper's), or the admin token."""
    settings = get_settings()
    assert settings.metrics_token is not None
    with contextlib.suppress(Unauthorized):
        return check_token(authorization)
    _check_bearer(
        authorization, "metrics token", "METRICS_TOKEN", settings.metrics_token.get_secret_value()
    )


def _check_bearer(authorization: str | None, what: str, setting: str, expected: str) -> None:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(f"send the {what} as 'Authorization: Bearer <{setting}>'")
    # Constant time, so the token cannot be guessed byte by byte from response times.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized(f"the {what} is wrong")


SessionDep = Annotated[Session, Depends(get_session)]
AdminDep = Depends(require_admin_token)


def reject_unknown_query(request: Request) -> None:
    """A misspelt query parameter (`?stauts=error`) would otherwise be ignored and the
    caller would get everything back: name it in a 422 instead."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = _query_names(dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        expected = ", ".join(sorted(known)) or "none"
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"unknown query parameter (this route takes: {expected})",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


# After AdminDep in a router's dependencies, so a caller without the token learns nothing.
KnownQueryDep = Depends(reject_unknown_query)

# The cursor every list takes (its `next_after`); ids are at most BIGINT.
After = Annotated[
    int | None,
    Query(
        ge=0,
        le=2**63 - 1,
        description="the previous page's `next_after`: the items that follow this id in "
        "the list's order (offset then counts from there)",
    ),
]
