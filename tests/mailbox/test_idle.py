"""Idle polls against the real Dovecot fixture: STATUS first, and no SELECT, no SEARCH
and at most two transactions when nothing is new; the login kept for the next poll."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from imapclient import IMAPClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from backend import crypto
from backend.db import get_engine
from backend.mailbox import pool
from backend.mailbox.imap import ImapSession
from backend.mailbox.polling import run_poll
from backend.mailbox.service import PollResult, poll_account
from backend.models import FolderCursor, Message
from tests.support.accounts import MailAccount, make_account
from tests.support.dovecot import Dovecot
from tests.support.mail import generated


class Counts:
    def __init__(self) -> None:
        self.commits = 0
        self.selects = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counts]:
    """Counts every committed database transaction and every SELECT sent to a server."""
    seen = Counts()
    select_folder = ImapSession.select

    def counted_select(self: ImapSession, folder: str) -> Any:
        seen.selects += 1
        return select_folder(self, folder)

    def committed(_connection: Any) -> None:
        seen.commits += 1

    monkeypatch.setattr(ImapSession, "select", counted_select)
    event.listen(get_engine(), "commit", committed)
    yield seen
    event.remove(get_engine(), "commit", committed)


def _reset(counts: Counts) -> None:
    counts.commits = counts.selects = 0


def test_an_idle_poll_selects_nothing_and_commits_twice_at_most(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    counts: Counts,
) -> None:
    dovecot.append_many(mail_user[0], [generated(i) for i in range(2)])
    account = mail_account(folders=["INBOX", "Archive"])
    dovecot.append(mail_user[0], generated(9), folder="Archive")
    first = run_poll(account.id, None)
    assert isinstance(first, PollResult) and first.messages == 3
    assert counts.selects == 2

    _reset(counts)
    idle = run_poll(account.id, None)

    assert isinstance(idle, PollResult)
    assert (idle.outcome, idle.messages) == ("success", 0)
    assert counts.selects == 0
    assert counts.commits <= 2


def test_new_mail_after_an_idle_poll_is_found_and_an_expunged_arrival_rescans(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    counts: Counts,
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(2)])
    account = mail_account()
    assert poll_account(account.id).messages == 2
    assert poll_account(account.id).messages == 0

    dovecot.append(username, generated(2))
    assert poll_account(account.id).messages == 1

    # Appended and expunged between two polls: the count is back where it was, UIDNEXT
    # is not, so the folder is searched (and nothing is stored).
    uid = dovecot.append(username, generated(3))
    with dovecot.client(username) as client:
        client.select_folder("INBOX")
        client.delete_messages([uid])
        client.expunge()
        client.logout()
    _reset(counts)
    assert poll_account(account.id).messages == 0
    assert counts.selects == 1
    _reset(counts)
    assert poll_account(account.id).messages == 0
    assert counts.selects == 0
    uids = db.scalars(select(Message.uid).where(Message.account_id == account.id)).all()
    assert sorted(uids) == [1, 2, 3]


def test_a_new_uidvalidity_with_the_same_uidnext_is_scanned_again(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    counts: Counts,
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(2)])
    account = mail_account()
    assert poll_account(account.id).messages == 2
    before = dovecot.folder_status(username)

    dovecot.set_uidvalidity(username, "INBOX", before[b"UIDVALIDITY"] + 7)
    assert dovecot.folder_status(username)[b"UIDNEXT"] == before[b"UIDNEXT"]
    _reset(counts)
    result = poll_account(account.id)

    assert (result.outcome, result.messages) == ("success", 0)  # held already, by content
    assert counts.selects == 1
    db.expire_all()
    cursor = db.scalars(select(FolderCursor).where(FolderCursor.account_id == account.id)).one()
    assert (cursor.uidvalidity, cursor.uidnext) == (
        before[b"UIDVALIDITY"] + 7,
        before[b"UIDNEXT"],
    )


@pytest.fixture
def logins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The username of every LOGIN (or AUTHENTICATE) sent to a server."""
    sent: list[str] = []
    login = ImapSession.login

    def counted_login(self: ImapSession, account: Any, credentials: Any) -> None:
        sent.append(account.username)
        login(self, account, credentials)

    monkeypatch.setattr(ImapSession, "login", counted_login)
    return sent


def test_the_next_poll_reuses_the_login_and_a_dropped_one_is_replaced(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    logins: list[str],
) -> None:
    username, password = mail_user
    dovecot.append(username, generated(0))
    account = mail_account()
    assert poll_account(account.id).messages == 1
    assert poll_account(account.id).outcome == "success"
    assert len(logins) == 1
    assert pool.kept() == 1

    dovecot.kick(username)  # the kept connection is gone; NOOP finds out
    dovecot.append(username, generated(1))
    result = poll_account(account.id)
    assert (result.outcome, result.messages) == ("success", 1)
    assert len(logins) == 2

    # New credentials (the same password, encrypted again) never get the old login.
    account.credentials_encrypted = crypto.encrypt_json({"password": password})
    db.commit()
    assert poll_account(account.id).outcome == "success"
    assert len(logins) == 3


def test_a_kept_session_leaves_its_folder_when_next_used_and_a_dropped_one_just_logs_out(
    db: Session,
    dovecot: Dovecot,
    mail_account: MailAccount,
    set_env: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll that selected a folder keeps its session as it is: the CLOSE goes with the
    next poll, as the check that the session still answers (no NOOP besides), and a
    session the pool lets go is logged out without one, by the closing thread, before
    the poll returns."""
    set_env(IMAP_POOL_SIZE=1)
    sent: list[str] = []
    logout_threads: list[str] = []
    for name in ("close_folder", "noop", "folder_status", "logout"):
        original = getattr(IMAPClient, name)

        def spy(self: IMAPClient, *args: Any, _name: str = name, _call: Any = original) -> Any:
            sent.append(_name)
            if _name == "logout":
                logout_threads.append(threading.current_thread().name)
            return _call(self, *args)

        monkeypatch.setattr(IMAPClient, name, spy)
    account = mail_account()
    username = account.username
    dovecot.append(username, generated(0))  # (the test's own IMAP clients are spied on too)
    sent.clear()
    assert poll_account(account.id).messages == 1
    assert sent == ["folder_status"] and pool.kept() == 1

    dovecot.append(username, generated(1))
    sent.clear()
    assert poll_account(account.id).messages == 1
    assert sent == ["close_folder", "folder_status"]

    other = make_account(db, dovecot)
    sent.clear()
    assert poll_account(other.id).outcome == "success"
    assert sent.count("logout") == 1 and "close_folder" not in sent and pool.kept() == 1
    assert logout_threads[-1].startswith("imap-logout")
    # The kept session is the other mailbox's: whatever its poll left, one command
    # checks it, and it is used again.
    sent.clear()
    assert poll_account(other.id).outcome == "success"
    assert sent[0] in ("noop", "close_folder") and "logout" not in sent


def test_the_pool_keeps_at_most_its_size_for_at_most_its_age(
    db: Session,
    dovecot: Dovecot,
    logins: list[str],
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_POOL_SIZE=2)
    accounts = [make_account(db, dovecot) for _ in range(3)]
    for account in accounts:
        assert poll_account(account.id).outcome == "success"
    assert pool.kept() == 2
    assert poll_account(accounts[2].id).outcome == "success"  # kept
    assert len(logins) == 3
    assert poll_account(accounts[0].id).outcome == "success"  # the oldest went
    assert len(logins) == 4

    set_env(IMAP_POOL_MAX_AGE_SECONDS=0.01)
    time.sleep(0.05)
    # Every kept session is now too old: each mailbox logs in again when next polled.
    # (How many the pool holds afterwards depends on how long a login takes, so it is
    # not asserted: a poll faster than the maximum age keeps its new session.)
    assert poll_account(accounts[0].id).outcome == "success"
    assert len(logins) == 5
    assert poll_account(accounts[2].id).outcome == "success"
    assert len(logins) == 6
