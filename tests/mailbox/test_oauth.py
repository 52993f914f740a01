"""XOAUTH2: a real local token endpoint (refresh) and a Dovecot that checks tokens at a
real local introspection endpoint."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from sqlalchemy.orm import Session

from backend import crypto
from backend.mailbox import oauth
from backend.mailbox.check import check_account
from backend.mailbox.imap import ImapAuthError, ImapConnectionError
from backend.mailbox.service import poll_account
from backend.models import Account
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated


class OAuthProvider:
    """A token endpoint (POST /token) and an introspection endpoint (POST /introspect)."""

    def __init__(self) -> None:
        self.valid_tokens: dict[str, str] = {}  # access token -> username
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> username
        self.token_requests: list[dict[str, str]] = []
        self.refuse_refresh = False
        self.issue_rejected_tokens = False  # hand out tokens the IMAP server will refuse
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if self.path == "/token":
                    status, body = provider.token(form)
                elif self.path == "/introspect":
                    status, body = provider.introspect(form)
                else:
                    status, body = 404, {"error": "not_found"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(form)
        username = self.refresh_tokens.get(form.get("refresh_token", ""))
        if self.refuse_refresh or form.get("grant_type") != "refresh_token" or not username:
            return 400, {"error": "invalid_grant"}
        del self.refresh_tokens[form["refresh_token"]]
        access, refresh = f"at-{uuid.uuid4().hex}", f"rt-{uuid.uuid4().hex}"
        if not self.issue_rejected_tokens:
            self.valid_tokens[access] = username
        self.refresh_tokens[refresh] = username
        return 200, {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": 3600,
            "token_type": "Bearer",
        }

    def introspect(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        username = self.valid_tokens.get(form.get("token", ""))
        if username is None:
            return 200, {"active": False}
        return 200, {"active": True, "username": username}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def provider() -> Iterator[OAuthProvider]:
    server = OAuthProvider()
    yield server
    server.close()


@pytest.fixture(scope="module")
def oauth_dovecot(provider: OAuthProvider) -> Iterator[Dovecot]:
    server = Dovecot(
        Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-oauth-")),
        oauth2_introspection_url=f"{provider.url}/introspect",
    )
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


def oauth_account(
    db: Session,
    dovecot: Dovecot,
    provider: OAuthProvider,
    *,
    access_token: str,
    expires_at: float,
    refresh_token: str,
) -> Account:
    username = f"oauth-{uuid.uuid4().hex[:8]}"
    provider.refresh_tokens[refresh_token] = username
    return make_account(
        db,
        dovecot,
        username=username,
        auth_method="oauth2",
        credentials={
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expires_at": expires_at,
            "client_id": "mailbeat",
            "client_secret": "client-secret",
            "token_url": f"{provider.url}/token",
        },
    )


def test_expired_token_is_refreshed_saved_encrypted_and_used_for_xoauth2(
    db: Session, oauth_dovecot: Dovecot, provider: OAuthProvider
) -> None:
    refresh = f"rt-{uuid.uuid4().hex}"
    account = oauth_account(
        db,
        oauth_dovecot,
        provider,
        access_token="expired-token",
        expires_at=time.time() - 10,
        refresh_token=refresh,
    )
    oauth_dovecot.append(account.username, generated(1))
    before = len(provider.token_requests)

    result = poll_account(account.id)

    assert (result.outcome, result.messages) == ("success", 1), result.error
    (request,) = provider.token_requests[before:]
    assert request == {
        "grant_type": "refresh_token",
        "refresh_token": refresh,
        "client_id": "mailbeat",
        "client_secret": "client-secret",
    }
    db.refresh(account)
    saved = crypto.decrypt_json(account.credentials_encrypted)
    assert saved["access_token"] in provider.valid_tokens
    assert saved["refresh_token"] != refresh and saved["refresh_token"] in provider.refresh_tokens
    assert saved["expires_at"] > time.time() + 3000
    assert saved["access_token"] not in account.credentials_encrypted

    # A valid token is used as it is: no second refresh.
    assert poll_account(account.id).outcome == "success"
    assert len(provider.token_requests) == before + 1


def test_a_token_the_server_rejects_is_refreshed_once_and_retried(
    db: Session, oauth_dovecot: Dovecot, provider: OAuthProvider
) -> None:
    refresh = f"rt-{uuid.uuid4().hex}"
    account = oauth_account(
        db,
        oauth_dovecot,
        provider,
        access_token="revoked-token",
        expires_at=time.time() + 3600,
        refresh_token=refresh,
    )
    before = len(provider.token_requests)
    result = poll_account(account.id)
    assert result.outcome == "success", result.error
    assert [r["refresh_token"] for r in provider.token_requests[before:]] == [refresh]
    db.refresh(account)  # the poll saved rotated tokens
    check = check_account(account, timeout=5)
    assert check.ok, check.detail
    assert len(provider.token_requests) == before + 1  # the saved token is used as it is


def test_check_account_refreshes_on_the_account_for_its_caller_to_commit(
    db: Session, oauth_dovecot: Dovecot, provider: OAuthProvider
) -> None:
    account = oauth_account(
        db,
        oauth_dovecot,
        provider,
        access_token="expired-token",
        expires_at=time.time() - 10,
        refresh_token=f"rt-{uuid.uuid4().hex}",
    )
    check = check_account(account, timeout=5)
    assert check.ok, check.detail
    assert crypto.decrypt_json(account.credentials_encrypted)["access_token"] in (
        provider.valid_tokens
    )


def test_a_refused_refresh_is_an_auth_failure(
    db: Session, oauth_dovecot: Dovecot, provider: OAuthProvider
) -> None:
    account = oauth_account(
        db,
        oauth_dovecot,
        provider,
        access_token="expired-token",
        expires_at=time.time() - 10,
        refresh_token="rt-unknown-to-the-provider",
    )
    provider.refresh_tokens.pop("rt-unknown-to-the-provider")
    result = poll_account(account.id)
    assert result.outcome == "auth_error"
    assert result.error is not None and "invalid_grant" in result.error
    db.refresh(account)
    assert account.last_error_kind == "auth"


def test_refresh_classifies_endpoint_failures(provider: OAuthProvider) -> None:
    with pytest.raises(ImapAuthError):
        oauth.refresh({"access_token": "x"})  # nothing to refresh with
    with pytest.raises(ImapConnectionError):
        oauth.refresh({"refresh_token": "r", "token_url": "http://127.0.0.1:9/token"})
    with pytest.raises(ImapAuthError, match="invalid_grant"):
        oauth.refresh({"refresh_token": "unknown", "token_url": f"{provider.url}/token"})


def test_needs_refresh() -> None:
    now = 1_000_000.0
    assert oauth.needs_refresh({"access_token": "a", "expires_at": now + 30}, now=now)
    assert not oauth.needs_refresh({"access_token": "a", "expires_at": now + 600}, now=now)
    assert not oauth.needs_refresh({"access_token": "a"}, now=now)
    assert oauth.needs_refresh({"access_token": "", "expires_at": now + 600}, now=now)
    assert oauth.needs_refresh(
        {"access_token": "a", "expires_at": "1970-01-12T13:46:40+00:00"}, now=now
    )


def test_a_refreshed_token_the_server_also_rejects_is_not_refreshed_again(
    db: Session, oauth_dovecot: Dovecot, provider: OAuthProvider
) -> None:
    account = oauth_account(
        db,
        oauth_dovecot,
        provider,
        access_token="revoked-token",
        expires_at=time.time() + 3600,
        refresh_token=f"rt-{uuid.uuid4().hex}",
    )
    # Last in this module: Dovecot delays logins from an address with recent failures.
    before = len(provider.token_requests)
    provider.issue_rejected_tokens = True
    try:
        result = poll_account(account.id)
    finally:
        provider.issue_rejected_tokens = False
    assert result.outcome == "auth_error", result.error
    assert len(provider.token_requests) == before + 1
