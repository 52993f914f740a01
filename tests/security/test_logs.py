"""No secret in any log line, whichever library writes it (issue 31: httpx's own INFO line
`HTTP Request: POST http://hookuser:webhook-basic-PASS@host/ok "HTTP/1.0 200 OK"` was
logged on every delivery to a webhook URL with basic auth; uvicorn's access log wrote
`?token=...` as it came)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import redaction
from backend.models import Account, WebhookDelivery
from backend.processing.service import hand_on
from tests.support.api import account_payload
from tests.support.receiver import SECRET, Receiver
from tests.support.uvicorn import running_api
from tests.support.webhooks import store_message

PASSWORD = "webhook-basic-PASS"


def test_a_delivery_to_a_url_with_basic_auth_logs_no_password(
    api: TestClient,
    db: Session,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://hookuser:{PASSWORD}@127.0.0.1:{receiver.port}/hook"
    webhooks_on(WEBHOOK_URL=url)  # the global target, and the account's own below
    created = api.post("/accounts", json=account_payload(webhook_url=url, webhook_secret=SECRET))
    assert created.status_code == 201, created.text
    account = db.get(Account, created.json()["id"])
    assert account is not None
    message = store_message(db, account, 1)
    caplog.set_level(logging.DEBUG)

    hand_on([message.id])

    deliveries = list(db.scalars(select(WebhookDelivery)))
    assert sorted(d.status for d in deliveries) == ["delivered", "delivered"]
    # The receiver was sent the credentials: they were used, not dropped.
    assert all(r.headers.get("authorization", "").startswith("Basic ") for r in receiver.requests)
    request_lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert len(request_lines) == 2, request_lines  # httpx logged, but redacted
    assert all("http://***@127.0.0.1" in line for line in request_lines), request_lines
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


def test_redaction_keeps_the_rest_of_a_line() -> None:
    assert (
        redaction.redact('POST https://u:p%40ss@hooks.example/x?a=1&token=abc&key=k "200"')
        == 'POST https://***@hooks.example/x?a=1&token=***&key=*** "200"'
    )
    plain = "mail from me@example.org, no URL"
    assert redaction.redact(plain) == plain


def test_the_access_log_does_not_write_a_token_from_the_query(tmp_path: Path) -> None:
    with running_api(tmp_path, log_level="info") as server:
        answer = httpx.get(f"{server.url}/accounts?token=sekrit-query-token&limit=1", timeout=10)
        assert answer.status_code == 401
        httpx.get(f"{server.url}/health?access_token=sekrit-access-token", timeout=10)
    log = server.log()
    assert "GET /accounts?token=***&limit=1 HTTP/1.1" in log  # the line is there, redacted
    assert "/health?access_token=***" in log
    assert "sekrit" not in log


def test_the_settings_secrets_are_redacted_whoever_logs_them(
    set_env: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    token = "an-admin-token-of-more-than-32-characters"
    set_env(ADMIN_API_TOKEN=token, WEBHOOK_SECRET="whsec-global-secret", METRICS_TOKEN="short")
    caplog.set_level(logging.INFO)
    logging.getLogger("httpx").warning("sent Authorization: Bearer %s", token)
    logging.getLogger("uvicorn.error").info("whsec-global-secret in a message")
    assert token not in caplog.text and "whsec-global-secret" not in caplog.text
    assert "sent Authorization: Bearer ***" in caplog.text
    # Too short to redact without redacting words: production refuses such tokens anyway.
    assert redaction.redact("a short story") == "a short story"
