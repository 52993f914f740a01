"""Providers' rules that Dovecot does not enforce, put in front of the real Dovecot by a
proxy (tests/support/imap_proxy.py): the poll against them, end to end."""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Message
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.imap_proxy import ImapProxy
from tests.support.mail import generated

_ID = re.compile(rb'^ID \("name" "mailbeat"', re.IGNORECASE)


def netease(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
    """imap.163.com and its siblings: no folder until the client has sent ID after login."""
    if command.upper().startswith(b"ID "):
        state["identified"] = True
    elif command.upper().startswith((b"SELECT", b"EXAMINE")) and not state.get("identified"):
        verb = command.split(b" ", 1)[0].upper()
        return tag + b" NO " + verb + b" Unsafe Login. Please contact kefu@188.com for help\r\n"
    return None


def test_a_server_that_demands_id_gets_all_its_mail(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [generated(index) for index in range(60)])
    with ImapProxy(dovecot.host, dovecot.imap_port, netease) as proxy:
        account = mail_account(imap_host=proxy.host, imap_port=proxy.port)

        result = poll_account(account.id)

        assert (result.outcome, result.messages, result.error) == ("success", 60, None)
        # Sent once, after the login and before any folder, in RFC 2971's form.
        ids = [index for index, command in enumerate(proxy.commands) if _ID.match(command)]
        first_folder = next(
            index
            for index, command in enumerate(proxy.commands)
            if command.upper().startswith((b"STATUS", b"EXAMINE"))
        )
        assert len(ids) == 1 and ids[0] < first_folder, proxy.commands
    uids = db.scalars(select(Message.uid).where(Message.account_id == account.id)).all()
    assert sorted(uids) == list(range(1, 61))


def test_without_id_the_same_server_refuses_the_folder(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    # What mailbeat met before it sent ID: the rule above is what the test relies on.
    set_env(IMAP_ID="{}")
    username, _ = mail_user
    dovecot.append(username, generated(1))
    with ImapProxy(dovecot.host, dovecot.imap_port, netease) as proxy:
        account = mail_account(imap_host=proxy.host, imap_port=proxy.port)

        result = poll_account(account.id)

        assert result.outcome != "success"
        assert result.error is not None and "Unsafe Login" in result.error
        assert not any(command.upper().startswith(b"ID") for command in proxy.commands)


def test_the_id_fields_are_a_setting(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_ID='{"name": "helpdesk", "contact": "ops@example.org"}')
    username, _ = mail_user
    dovecot.append(username, generated(1))
    with ImapProxy(dovecot.host, dovecot.imap_port, netease) as proxy:
        account = mail_account(imap_host=proxy.host, imap_port=proxy.port)
        assert poll_account(account.id).messages == 1
    assert b'ID ("name" "helpdesk" "contact" "ops@example.org")' in proxy.commands


# What providers answer when they shed load, each on the command it refuses, and the
# wait the account should then have (seconds; None: THROTTLE_BACKOFF_SECONDS).
THROTTLES = [
    (b"AUTHENTICATE", b"* BYE [UNAVAILABLE] Server busy, come back later\r\n", None),
    (b"EXAMINE", b"{tag} NO [THROTTLED] Request is throttled. Try again in 90 seconds.\r\n", 90),
    (b"STATUS", b"{tag} NO [LIMIT] Too many commands\r\n", None),
    (b"EXAMINE", b"{tag} NO Account exceeded command or bandwidth limits. (Failure)\r\n", None),
    (b"STATUS", b"* BYE Server Unavailable. 15\r\n", None),
    (b"AUTHENTICATE", b"{tag} NO [UNAVAILABLE] Temporary authentication failure\r\n", None),
]


def test_a_throttling_provider_never_disables_the_mailbox(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(MAX_CONSECUTIVE_FAILURES=3, THROTTLE_BACKOFF_SECONDS=45)
    username, _ = mail_user
    dovecot.append_many(username, [generated(index) for index in range(5)])
    throttle: list[tuple[bytes, bytes, int | None]] = []

    def provider(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        if throttle and command.upper().startswith(throttle[0][0]):
            return throttle[0][1].replace(b"{tag}", tag)
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, provider) as proxy:
        account = mail_account(imap_host=proxy.host, imap_port=proxy.port)
        for answer in THROTTLES:
            throttle[:] = [answer]
            result = poll_account(account.id, force=True)

            assert result.outcome == "throttled_error", (answer, result.error)
            assert result.account_event is None
            db.refresh(account)
            assert (account.enabled, account.status) == (True, "active")
            assert (account.consecutive_failures, account.last_error_kind) == (0, "throttled")
            assert "throttled by the server" in (account.last_error or "")
            assert account.backoff_until is not None and account.last_polled_at is not None
            wait = (account.backoff_until - account.last_polled_at).total_seconds()
            assert abs(wait - (answer[2] or 45)) < 5, (answer, wait)
            assert poll_account(account.id).outcome == "skipped"  # waits as asked

        throttle.clear()  # the throttle ends
        result = poll_account(account.id, force=True)

    assert (result.outcome, result.messages) == ("success", 5)
    db.refresh(account)
    assert (account.status, account.last_error, account.backoff_until) == ("active", None, None)
