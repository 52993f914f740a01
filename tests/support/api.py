"""The admin API under test: a TestClient on the real app, and the admin token header.

Loaded as a pytest plugin by tests/conftest.py, before the test bed sets the environment,
so the app is imported only inside the fixtures.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient

if TYPE_CHECKING:
    from tests.support.dovecot import Dovecot


def auth_headers() -> dict[str, str]:
    from tests.conftest import ADMIN_TOKEN

    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_client(headers: dict[str, str]) -> TestClient:
    from backend.main import create_app

    return TestClient(create_app(), headers=headers, raise_server_exceptions=False)


@pytest.fixture
def api() -> Iterator[TestClient]:
    """The real app (lifespan included); requests carry the admin token."""
    with make_client(auth_headers()) as client:
        yield client


@pytest.fixture
def anonymous() -> Iterator[TestClient]:
    """The real app without the admin token."""
    with make_client({}) as client:
        yield client


def account_payload(**fields: Any) -> dict[str, Any]:
    """A valid POST /accounts body for a mailbox nobody else uses; fields override."""
    name = uuid.uuid4().hex[:10]
    payload: dict[str, Any] = {
        "email": f"{name}@example.com",
        "imap_host": "imap.example.com",
        "imap_port": 993,
        "imap_security": "ssl",
        "username": name,
        "password": f"pw-{name}",
        "folders": ["INBOX"],
        "poll_interval_seconds": 300,
    }
    payload.update(fields)
    return payload


def create_dovecot_account(
    api: TestClient, dovecot: Dovecot, user: str, password: str, **fields: Any
) -> int:
    """POST /accounts for a mailbox on the Dovecot fixture (plain IMAP); returns its id."""
    payload = account_payload(
        imap_host=dovecot.host,
        imap_port=dovecot.imap_port,
        imap_security="none",
        username=user,
        password=password,
    )
    payload.update(fields)
    response = api.post("/accounts", json=payload)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])
