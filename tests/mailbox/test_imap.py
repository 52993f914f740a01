"""Connections: TLS modes and trust, timeouts against a server that never answers,
check_account's stages, and the session's commands."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox import imap
from backend.mailbox.check import check_account
from backend.mailbox.service import poll_account
from backend.models import ImapSecurity, Message
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.imap_server import FakeImapServer
from tests.support.mail import generated
from tests.support.net import free_port
from tests.support.servers import RealServer, on_both_servers


def test_a_server_that_never_answers_times_out(
    db: Session,
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_CONNECT_TIMEOUT=1, IMAP_READ_TIMEOUT=1)
    with FakeImapServer(greeting=None) as server:
        account = mail_account(imap_port=server.port)
        result = poll_account(account.id)

    assert result.outcome == "connection_error"
    assert result.error is not None and "timed out" in result.error
    db.refresh(account)
    assert account.last_error_kind == "connection"
    assert account.status == "error"
    assert account.backoff_until is not None


def test_a_server_that_stops_answering_after_the_greeting_times_out(
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_CONNECT_TIMEOUT=1, IMAP_READ_TIMEOUT=1)
    with FakeImapServer(answer=False) as server:  # greets, then answers nothing
        account = mail_account(imap_port=server.port)
        result = poll_account(account.id)
        assert server.commands  # the client did get past the greeting
    assert result.outcome == "connection_error"
    assert result.error is not None and "timed out" in result.error


@on_both_servers
def test_implicit_tls_trusted_through_imap_ca_bundle(
    db: Session,
    mail_server: RealServer,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_CA_BUNDLE=mail_server.cert_path)
    mail_server.append(mail_user[0], generated(1))
    account = mail_account(imap_security="ssl", imap_port=mail_server.imaps_port)
    result = poll_account(account.id)
    assert (result.outcome, result.messages) == ("success", 1)


def test_implicit_tls_refused_without_the_ca(
    db: Session,
    dovecot: Dovecot,
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_CA_BUNDLE=None)
    account = mail_account(imap_security="ssl", imap_port=dovecot.imaps_port)
    result = poll_account(account.id)
    assert result.outcome == "connection_error"
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error
    check = check_account(account, timeout=5)
    assert (check.ok, check.stage) == (False, "tls")


@on_both_servers
def test_starttls_trusted_through_imap_ca_bundle_and_refused_without(
    mail_server: RealServer,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_CA_BUNDLE=mail_server.cert_path)
    mail_server.append(mail_user[0], generated(1))
    account = mail_account(imap_security="starttls", imap_port=mail_server.imap_port)
    session = imap.connect(mail_server.host, mail_server.imap_port, "starttls")
    try:
        assert session.tls_version() is not None  # an SSLSocket after STARTTLS
    finally:
        session.close()
    assert poll_account(account.id).messages == 1

    set_env(IMAP_CA_BUNDLE=None)
    with pytest.raises(imap.ImapTlsError):
        imap.connect(mail_server.host, mail_server.imap_port, "starttls")


def test_check_account_reports_folders(
    dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    dovecot.append_many(mail_user[0], [generated(1), generated(2)])
    account = mail_account(folders=["INBOX", "Missing"])
    check = check_account(account, timeout=5)
    assert not check.ok
    assert check.stage == "folder"
    assert [(f.name, f.ok, f.messages) for f in check.folders] == [
        ("INBOX", True, 2),
        ("Missing", False, None),
    ]
    assert "Missing" in check.detail

    account.folders = ["INBOX"]
    ok = check_account(account, timeout=5)
    assert (ok.ok, ok.stage, ok.detail) == (True, "folder", "ok")


def test_check_account_stages(mail_user: tuple[str, str], mail_account: MailAccount) -> None:
    _, password = mail_user
    account = mail_account(credentials={"password": password + "-wrong"})
    auth = check_account(account, timeout=5)
    assert (auth.ok, auth.stage) == (False, "auth")
    assert password not in auth.detail

    account.imap_port = free_port()  # nothing listens there
    refused = check_account(account, timeout=5)
    assert (refused.ok, refused.stage) == (False, "connect")
    account.imap_security = ImapSecurity.SSL  # refused before any TLS: still the connect stage
    assert check_account(account, timeout=5).stage == "connect"

    account.imap_host = "no-such-host.invalid"
    unknown = check_account(account, timeout=5)
    assert (unknown.ok, unknown.stage) == (False, "dns")


def test_session_status_select_and_an_exact_uid_search(
    dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, password = mail_user
    dovecot.append_many(username, [generated(1), generated(2)])
    account = mail_account()
    with imap.open_account(account, credentials=lambda _refresh: {"password": password}) as session:
        status = session.status("INBOX")
        assert (status.messages, status.uidnext) == (2, 3)
        selected = session.select("INBOX")
        assert (selected.uidvalidity, selected.exists) == (status.uidvalidity, 2)
        assert session.search() == [1, 2]
        # On the wire `UID 3:*` matches UID 2, the newest message; the session drops it.
        assert session.search(uid_from=3) == []
        assert session.search(uid_to=1) == [1]
        assert list(session.fetch_bodies({2: 10})) == [2]


def test_folder_names_beyond_ascii(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    folder = "Entwürfe 東京"
    dovecot.append(username, generated(1), folder=folder)
    account = mail_account(folders=[folder])
    result = poll_account(account.id)
    assert (result.outcome, result.messages) == ("success", 1)
    assert db.scalars(select(Message.folder).where(Message.account_id == account.id)).all() == [
        folder
    ]
    assert check_account(account, timeout=5).folders[0].messages == 1


@pytest.mark.parametrize("security", ["none", "ssl"])
def test_imap_sockets_send_small_writes_at_once(
    dovecot: Dovecot, security: str, set_env: Callable[..., None]
) -> None:
    set_env(IMAP_CA_BUNDLE=dovecot.cert_path)
    # Without TCP_NODELAY a login's second write (AUTHENTICATE's continuation) waited
    # for the delayed ACK of the first: 47 ms per login instead of 4 (docs/benchmarks.md).
    port = dovecot.imap_port if security == "none" else dovecot.imaps_port
    session = imap.connect(dovecot.host, port, security)
    try:
        sock = session._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        session.close()
