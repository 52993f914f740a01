"""FastAPI dependencies: a database session per request and the admin token check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
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
    expected = get_settings().admin_token()
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send the admin token as 'Authorization: Bearer <ADMIN_API_TOKEN>'")
    # Constant time, so the token cannot be guessed byte by byte from response times.
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("the admin token is wrong")


SessionDep = Annotated[Session, Depends(get_session)]
AdminDep = Depends(require_admin_token)
