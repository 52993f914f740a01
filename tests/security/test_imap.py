"""What reaches an IMAP server (the real Dovecot fixture): no command a caller wrote, no
connection the outbound policy refuses, and no server banner back in /test's answer.

The accounts are written straight to the database, as they could have been saved before
the API refused such values (tests/security/test_inputs.py): the IMAP layer must hold
on its own."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend import crypto
from backend.mailbox.service import poll_account
from backend.models import Account
from backend.models.enums import AuthMethod
from tests.support.api import auth_headers, create_dovecot_account, make_client
from tests.support.dovecot import Dovecot
from tests.support.imap_server import FakeImapServer


def stored_account(
    db: Session, host: str, port: int, username: str = "probe", password: str = "x"
) -> Account:
    account = Account(
        email=f"{uuid.uuid4().hex[:8]}@example.org",
        imap_host=host,
        imap_port=port,
        imap_security="none",
        username=username,
        auth_method="password",
        credentials_encrypted=crypto.encrypt_json({"password": password}),
        folders=["INBOX"],
        poll_interval_seconds=300,
    )
    db.add(account)
    db.commit()
    return account


def folders_of(dovecot: Dovecot, user: str) -> set[str]:
    with dovecot.client(user) as client:
        names = {name for _flags, _delimiter, name in client.list_folders()}
        client.logout()
    return names


def test_a_crlf_in_the_username_sends_no_command_of_its_own(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    user, password = mail_user
    # LOGIN as the user, then CREATE: what the probe sent through /test.
    username = f'{user} "{password}"\r\nX1 CREATE injected\r\nX2 NOOP'
    account = stored_account(db, dovecot.host, dovecot.imap_port, username, password)

    response = api.post(f"/accounts/{account.id}/test")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is False
    assert body["stage"] == "auth"
    assert "control characters" in body["detail"]
    assert "injected" not in folders_of(dovecot, user)


def test_a_crlf_in_a_password_sends_no_command_of_its_own(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    user, password = mail_user
    account = stored_account(
        db, dovecot.host, dovecot.imap_port, user, f'{password}\r\nX1 CREATE injected\r\nX2 NOOP "'
    )

    body = api.post(f"/accounts/{account.id}/test").json()

    assert body["ok"] is False and body["stage"] == "auth"
    assert password not in body["detail"]
    assert "injected" not in folders_of(dovecot, user)


def test_a_non_ascii_password_is_an_auth_failure_that_shows_none_of_it(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    user, _ = mail_user
    account = stored_account(db, dovecot.host, dovecot.imap_port, user, "sécret-pässword")

    response = api.post(f"/accounts/{account.id}/test")

    # Was a 500 whose log held "can't encode character '\xe9' in position 1".
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is False and body["stage"] == "auth"
    for piece in ("é", "\\u00e9", "position", "pässword"):
        assert piece not in response.text


def test_non_ascii_folder_names_are_sent_encoded(
    api: TestClient, dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    user, password = mail_user
    dovecot.append(user, b"Subject: hi\r\n\r\nhello\r\n", folder="Entwürfe")
    account_id = create_dovecot_account(api, dovecot, user, password, folders=["INBOX", "Entwürfe"])

    body = api.post(f"/accounts/{account_id}/test").json()

    assert body["ok"] is True, body
    assert [(f["name"], f["ok"], f["messages"]) for f in body["folders"]] == [
        ("INBOX", True, 0),
        ("Entwürfe", True, 1),
    ]


class Listener:
    """A TCP server on loopback that counts connections and greets with `banner`."""

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(self.banner)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def ssh_like() -> Iterator[Listener]:
    listener = Listener(b"SSH-2.0-OpenSSH_9.6p1 internal-build-7\r\n")
    yield listener
    listener.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_production_connects_to_no_internal_imap_host(
    db: Session, set_env: Callable[..., None], ssh_like: Listener, host: str
) -> None:
    set_env(ENVIRONMENT="production")
    account = stored_account(db, host, ssh_like.port)
    with make_client(auth_headers()) as api:
        body = api.post(f"/accounts/{account.id}/test").json()
    assert body["ok"] is False
    assert body["stage"] == "connect"
    assert "is a loopback address, refused by the outbound policy" in body["detail"]
    assert ssh_like.accepted == 0


def test_the_allowlist_lets_an_internal_imap_host_through(
    db: Session,
    set_env: Callable[..., None],
    dovecot: Dovecot,
    mail_user: tuple[str, str],
) -> None:
    set_env(ENVIRONMENT="production", OUTBOUND_ALLOWLIST=f"{dovecot.host}/32")
    user, password = mail_user
    account = stored_account(db, dovecot.host, dovecot.imap_port, user, password)
    with make_client(auth_headers()) as api:
        body = api.post(f"/accounts/{account.id}/test").json()
    assert body["ok"] is True, body


def test_test_does_not_return_a_service_banner(
    api: TestClient, db: Session, ssh_like: Listener
) -> None:
    account = stored_account(db, "127.0.0.1", ssh_like.port)
    body = api.post(f"/accounts/{account.id}/test").json()
    assert body["ok"] is False
    assert ssh_like.accepted == 1
    assert "OpenSSH" not in body["detail"]
    assert "internal-build" not in body["detail"]


def _login_disabled(tag: bytes, command: bytes) -> bytes | None:
    # Cyrus with `allowplaintext: no`, before STARTTLS.
    if command.upper().startswith(b"CAPABILITY"):
        return b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n" + tag + b" OK done\r\n"
    return None


@pytest.mark.parametrize("method", ["password", "oauth2"])
def test_a_server_that_disables_login_in_clear_gets_no_credentials(
    api: TestClient, db: Session, method: str
) -> None:
    secret = f"never-in-clear-{uuid.uuid4().hex}"
    with FakeImapServer(respond=_login_disabled) as server:
        account = stored_account(db, "127.0.0.1", server.port, "probe", secret)
        if method == "oauth2":
            account.auth_method = AuthMethod.OAUTH2
            account.credentials_encrypted = crypto.encrypt_json(
                {"access_token": secret, "expires_at": 4_000_000_000}
            )
            db.commit()

        result = poll_account(account.id)
        body = api.post(f"/accounts/{account.id}/test").json()
        sent = b"\n".join(server.commands)

    # Issue 31: LOGIN "probe" <password> went out in clear, and the error said to check
    # the username and password.
    assert secret.encode() not in sent
    assert b"LOGIN" not in sent.upper() and b"AUTHENTICATE" not in sent.upper()
    assert result.outcome == "auth_error"
    db.expire_all()
    assert "LOGINDISABLED" in (db.get(Account, account.id).last_error or "")  # type: ignore[union-attr]
    assert body["ok"] is False and body["stage"] == "auth"
    assert "set imap_security to 'starttls'" in body["detail"]
