"""Push when a folder or a login changes under the watcher (issue 28, "errors stay where
they happen"): real watcher and worker processes, real Redis and PostgreSQL, the Dovecot
fixture; the proxy (tests/support/imap_proxy.py) and the fake server
(tests/support/imap_server.py) for what Dovecot does not do (Cyrus keeps a session on a
deleted folder and sends it only EXPUNGE; a NO or BYE on DONE). Accounts poll every
300 s: mail that arrives was fetched because of the push."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox import budget
from backend.models import Account, AccountStatus, PollRun, PushStatus
from tests.e2e.test_push import LONG_INTERVAL, celery, push_status, pushed, stored, watching
from tests.support.accounts import make_account
from tests.support.celery import Celery
from tests.support.dovecot import Dovecot
from tests.support.imap_proxy import ImapProxy
from tests.support.imap_server import FakeImapServer, FakeMessage
from tests.support.mail import generated
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

__all__ = ["celery"]  # the fixture, shared with test_push.py


def fresh(db: Session, account: Account) -> Account:
    db.rollback()
    found = db.get(Account, account.id)
    assert found is not None
    db.refresh(found)
    return found


def test_a_deleted_folder_fails_alone_and_is_watched_again_once_recreated(
    celery: Celery, db: Session, dovecot: Dovecot
) -> None:
    """The Cyrus report: one folder's `Mailbox does not exist` set the account's backoff
    and every push poll after it was skipped, INBOX news too."""
    account = pushed(db, dovecot)
    dovecot.create_folder(account.username, "Archive")
    account.folders = ["INBOX", "Archive"]
    db.commit()
    celery.worker()
    watcher = celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)

    with dovecot.client(account.username) as client:
        client.delete_folder("Archive")
        client.logout()
    dovecot.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "INBOX mail, through push", details=celery.logs)
    wait_for(
        lambda: "Archive" in (fresh(db, account).folder_errors or {}),
        "the folder's error",
        details=celery.logs,
    )
    now = fresh(db, account)
    assert (now.status, now.backoff_until, now.consecutive_failures) == (
        AccountStatus.ACTIVE,
        None,
        0,
    )
    dovecot.append(account.username, generated(2))
    wait_for(lambda: stored(db, account) == 2, "more INBOX mail", details=celery.logs)
    db.rollback()
    backing_off = select(PollRun.id).where(
        PollRun.account_id == account.id, PollRun.error.contains("backing off")
    )
    assert db.scalars(backing_off).first() is None

    dovecot.create_folder(account.username, "Archive")
    dovecot.append(account.username, generated(3), folder="Archive")
    wait_for(lambda: stored(db, account) == 3, "mail in the recreated folder", details=celery.logs)
    wait_for(
        lambda: fresh(db, account).folder_errors is None, "the error gone", details=celery.logs
    )
    assert f"mailbox {account.id}: 'Archive' watched again" in watcher.log()


def idle_server(first_idle: bytes, recreate: Callable[[FakeImapServer], None]) -> FakeImapServer:
    """A fake server with IDLE whose first IDLE is answered with `first_idle` (after the
    continuation); `recreate` then changes the folder as the server would."""
    idles = 0
    lock = threading.Lock()

    def respond(tag: bytes, command: bytes) -> bytes | None:
        nonlocal idles
        if command.upper().startswith(b"CAPABILITY"):
            return b"* CAPABILITY IMAP4rev1 IDLE\r\n" + tag + b" OK done\r\n"
        if command.upper() == b"IDLE":
            with lock:
                idles += 1
                first = idles == 1
            if first:
                recreate(server)
                return b"+ idling\r\n" + first_idle
            return b"+ idling\r\n"
        return None

    server = FakeImapServer(
        [FakeMessage(1, generated(1))],
        greeting=b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n",
        respond=respond,
    )
    return server


def renumber(server: FakeImapServer) -> None:
    server.uidvalidity += 1
    server.messages = {1: FakeMessage(1, generated(2))}


def idles(server: FakeImapServer) -> int:
    return sum(1 for command in server.commands if command.upper() == b"IDLE")


@pytest.mark.parametrize(
    "news",
    [b"* 1 EXPUNGE\r\n", b"* OK [UIDVALIDITY 8] renumbered\r\n"],
    ids=["every-message-expunged", "uidvalidity-in-idle"],
)
def test_a_folder_recreated_under_the_link_is_selected_again(
    celery: Celery, db: Session, news: bytes
) -> None:
    with idle_server(news, renumber) as server:
        account = make_account(
            db,
            push=True,
            imap_host="127.0.0.1",
            imap_port=server.port,
            imap_security="none",
            poll_interval_seconds=LONG_INTERVAL,
        )
        celery.worker()
        watcher = celery.watcher()
        wait_for(
            lambda: idles(server) >= 2, "IDLE on the folder selected again", details=celery.logs
        )
        assert f"mailbox {account.id}: selecting 'INBOX' again" in watcher.log()
        # The recreated folder's message, through the poll sent as IDLE came back.
        wait_for(lambda: stored(db, account) == 1, "the message", details=celery.logs)
        assert push_status(db, account) == PushStatus.WATCHING


def test_a_uidvalidity_found_by_a_poll_selects_the_folder_again(
    celery: Celery, db: Session
) -> None:
    """The link heard nothing (a server that keeps it on the deleted folder quietly): the
    poll that IDLE sent finds the new UIDVALIDITY, and the watcher selects again."""
    with idle_server(b"", renumber) as server:
        account = make_account(
            db,
            push=True,
            imap_host="127.0.0.1",
            imap_port=server.port,
            imap_security="none",
            poll_interval_seconds=LONG_INTERVAL,
        )
        celery.worker()
        watcher = celery.watcher()
        wait_for(
            lambda: idles(server) >= 2, "IDLE on the folder selected again", details=celery.logs
        )
        assert (
            f"mailbox {account.id}: selecting 'INBOX' again: a poll found UIDVALIDITY "
            f"{server.uidvalidity}"
        ) in watcher.log()


@pytest.mark.parametrize("answer", [b"NO [NONEXISTENT] mailbox deleted", b"BYE"], ids=["no", "bye"])
def test_no_or_bye_on_done_connects_again_and_news_still_arrives(
    celery: Celery,
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
    answer: bytes,
) -> None:
    set_env(WATCHER_IDLE_SECONDS=1)  # DONE every second
    refused = threading.Event()

    def rule(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        if command.upper() == b"IDLE":
            state["idle"] = tag
        elif tag.upper() == b"DONE" and "idle" in state and not refused.is_set():
            refused.set()
            if answer == b"BYE":
                return b"* BYE mailbox deleted\r\n"
            idle = state["idle"]
            assert isinstance(idle, bytes)
            return idle + b" " + answer + b"\r\n"
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, rule) as proxy:
        account = pushed(db, dovecot)
        account.imap_port = proxy.port
        db.commit()
        celery.worker()
        watcher = celery.watcher()
        wait_for(refused.is_set, "DONE answered with " + answer.decode(), details=celery.logs)
        wait_for(
            lambda: f"mailbox {account.id}: 'INBOX' watched again" in watcher.log(),
            "the watcher connecting again",
            details=celery.logs,
        )
        dovecot.append(account.username, generated(1))
        wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)


def test_a_new_password_is_used_at_once_and_push_status_follows(
    celery: Celery, db: Session, dovecot: Dovecot, api: TestClient
) -> None:
    account = pushed(db, dovecot)
    celery.worker()
    watcher = celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)

    dovecot.add_user(account.username, "the-new-one")
    changed = api.patch(f"/accounts/{account.id}", json={"password": "the-new-one"})
    assert changed.status_code == 200
    # Not null until a reconnect that might never come: the watcher connects at once.
    wait_for(
        lambda: push_status(db, account) == PushStatus.WATCHING,
        "push_status set again",
        details=celery.logs,
    )
    assert f"mailbox {account.id}: new login; connecting again" in watcher.log()
    dovecot.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)


def test_a_server_down_shows_failing_with_the_last_confirmation(
    celery: Celery, db: Session, dovecot: Dovecot, api: TestClient
) -> None:
    with ImapProxy(dovecot.host, dovecot.imap_port, lambda *_: None) as proxy:
        account = pushed(db, dovecot)
        account.imap_port = proxy.port
        db.commit()
        celery.worker()
        celery.watcher()
        wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)
    # The proxy is gone: the link drops and connecting again is refused.
    wait_for(
        lambda: push_status(db, account) == PushStatus.FAILING,
        "push_status failing",
        details=celery.logs,
    )
    shown = api.get(f"/accounts/{account.id}").json()
    assert shown["push_status"] == "failing"
    assert shown["push_confirmed_at"] is not None  # when it was last watched


def test_a_folder_renumbered_by_the_server_is_watched_on(
    celery: Celery, db: Session, dovecot: Dovecot
) -> None:
    """doveadm gives INBOX a new UIDVALIDITY under the watcher: its mail is matched once,
    and news of mail after the change still comes through push."""
    account = pushed(db, dovecot)
    celery.worker()
    celery.watcher()
    wait_for(lambda: watching(db, account), "the watcher's IDLE", details=celery.logs)
    dovecot.append(account.username, generated(1))
    wait_for(lambda: stored(db, account) == 1, "the message, through push", details=celery.logs)

    before = dovecot.folder_status(account.username)[b"UIDVALIDITY"]
    dovecot.set_uidvalidity(account.username, "INBOX", before + 1000)
    dovecot.append(account.username, generated(2))
    wait_for(lambda: stored(db, account) == 2, "mail after the change", details=celery.logs)
    dovecot.append(account.username, generated(3))
    wait_for(lambda: stored(db, account) == 3, "and after that", details=celery.logs)


def test_a_throttle_ending_the_idle_link_marks_the_host_and_waits_before_reconnecting(
    celery: Celery,
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
) -> None:
    set_env(WATCHER_IDLE_SECONDS=1, THROTTLE_BACKOFF_MAX_SECONDS=900)  # DONE every second
    said = threading.Event()

    def rule(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        if tag.upper() == b"DONE" and not said.is_set():
            said.set()
            return b"* BYE [UNAVAILABLE] Too many connections, try again in 600 seconds\r\n"
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, rule) as proxy:
        account = pushed(db, dovecot)
        account.imap_host, account.imap_port = proxy.host, proxy.port
        db.commit()
        watcher = celery.watcher()
        wait_for(said.is_set, "the BYE on DONE", details=celery.logs)
        wait_for(
            lambda: f"mailbox {account.id}: watching 'INBOX' failed" in watcher.log(),
            "the watcher's failure",
            details=celery.logs,
        )
        log = watcher.log()
        # The server's wait, not the first retry's second or so; the host marked as a
        # poll marks it (one connection at a time, for every process).
        assert "(throttled by the server (connect): UNAVAILABLE, retry after 600s)" in log
        assert "again in 600.0s" in log, log
        until = budget.throttled_until(proxy.host)
        assert until is not None and until > time.time() + 500


def test_a_watcher_does_not_connect_to_a_throttled_host_before_its_wait_is_over(
    celery: Celery, db: Session, dovecot: Dovecot
) -> None:
    with ImapProxy(dovecot.host, dovecot.imap_port, lambda *_: None) as proxy:
        account = pushed(db, dovecot)
        account.imap_host, account.imap_port = proxy.host, proxy.port
        db.commit()
        budget.throttled(proxy.host, 600)  # as a poll marks it
        watcher = celery.watcher()
        wait_for(
            lambda: "throttled the connections: waiting its turn" in watcher.log(),
            "the watcher's wait",
            details=celery.logs,
        )
        assert proxy.most == 0
        assert push_status(db, account) != PushStatus.WATCHING
