"""A hostile or broken IMAP server (tests/support/imap_server.py on loopback) costs one
poll of one mailbox, never a worker: literals far above the stated size are refused,
a trickle is cut at the poll deadline, absurd UIDs are skipped, a poll that never
finished is closed as a failure."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend import crypto
from backend.mailbox.service import PollResult, poll_account
from backend.models import Account, Message, PollOutcome, PollRun, utcnow
from tests.support.imap_server import FakeImapServer, FakeMessage

SECRET_SUBJECT = "Quarterly numbers for the board only"


def raw(uid: int) -> bytes:
    return f"Subject: {SECRET_SUBJECT} {uid}\r\n\r\nconfidential body {uid}\r\n".encode()


def account_on(db: Session, server: FakeImapServer) -> Account:
    account = Account(
        email="hostile@example.org",
        imap_host="127.0.0.1",
        imap_port=server.port,
        imap_security="none",
        username="hostile",
        credentials_encrypted=crypto.encrypt_json({"password": "pw"}),
        folders=["INBOX"],
        poll_interval_seconds=60,
    )
    db.add(account)
    db.commit()
    return account


def poll_within(seconds: float, account_id: int) -> PollResult:
    """The poll's result; fails if it is still running after `seconds`."""
    result: list[PollResult] = []
    thread = threading.Thread(target=lambda: result.append(poll_account(account_id)), daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert result, f"the poll was still running after {seconds}s"
    return result[0]


def rows(db: Session, account_id: int) -> dict[int, Message]:
    db.expire_all()
    found = db.scalars(select(Message).where(Message.account_id == account_id))
    return {message.uid: message for message in found}


def assert_clean_error(text: str | None) -> None:
    assert text is not None
    assert len(text) <= 400, text
    assert SECRET_SUBJECT not in text and "confidential" not in text, text


def test_a_literal_far_above_the_stated_size_is_refused_and_the_message_skipped(
    db: Session, set_env: Callable[..., None]
) -> None:
    set_env(MAX_MESSAGE_BYTES=1024 * 1024)
    messages = [FakeMessage(1, raw(1)), FakeMessage(2, raw(2), literal=120_000_000)]
    with FakeImapServer(messages) as server:
        account = account_on(db, server)
        first = poll_within(60, account.id)
        # Refused on the literal's announcement: the 120 MB were never read.
        assert server.body_bytes_sent < 20_000_000
        assert first.outcome == PollOutcome.CONNECTION_ERROR
        assert_clean_error(first.error)
        assert "UID 2" in (first.error or "")
        db.execute(update(Account).where(Account.id == account.id).values(backoff_until=None))
        db.commit()
        second = poll_within(60, account.id)

    assert second.outcome == PollOutcome.SUCCESS, second.error
    held = rows(db, account.id)
    assert sorted(held) == [1, 2]
    assert held[1].skipped_reason is None and held[1].storage_key is not None
    reason = held[2].skipped_reason or ""
    assert "announced 120000000 bytes" in reason and held[2].storage_key is None
    assert_clean_error(reason)
    assert db.get(Account, account.id).message_count == 2  # type: ignore[union-attr]


def test_a_trickled_body_is_cut_at_the_poll_deadline(
    db: Session, set_env: Callable[..., None]
) -> None:
    # A byte every 0.2 s never trips the read timeout; only the deadline ends it.
    set_env(POLL_DEADLINE_SECONDS=3, IMAP_READ_TIMEOUT=5)
    with FakeImapServer([FakeMessage(1, raw(1) * 50, trickle=0.2)]) as server:
        account = account_on(db, server)
        result = poll_within(30, account.id)  # the trickle alone would take 200 s
    assert result.outcome == PollOutcome.CONNECTION_ERROR
    assert "deadline" in (result.error or "")
    assert_clean_error(result.error)
    db.expire_all()
    run = db.get(PollRun, result.poll_run_id)
    assert run is not None and run.finished_at is not None
    assert db.get(Account, account.id).consecutive_failures == 1  # type: ignore[union-attr]


def test_uids_beyond_32_bits_are_skipped_and_recorded(db: Session) -> None:
    absurd = [2**32, 2**64]
    with FakeImapServer([FakeMessage(1, raw(1))], search_extra=absurd) as server:
        account = account_on(db, server)
        result = poll_within(60, account.id)
    assert result.outcome == PollOutcome.SUCCESS, result.error
    assert sorted(rows(db, account.id)) == [1]
    db.expire_all()
    run = db.get(PollRun, result.poll_run_id)
    assert run is not None
    assert "ignored 2 UIDs outside 1..4294967295" in (run.error or "")
    assert str(2**64) in (run.error or "")
    assert db.get(Account, account.id).last_error is None  # type: ignore[union-attr]


@pytest.mark.parametrize("failures_before", [0, 1])
def test_a_poll_that_never_finished_is_closed_as_a_failure(
    db: Session, failures_before: int
) -> None:
    with FakeImapServer([FakeMessage(1, raw(1))]) as server:
        account = account_on(db, server)
        account.consecutive_failures = failures_before
        # The worker running this poll was killed (SIGKILL, OOM, the hard time limit).
        dead = PollRun(
            account_id=account.id,
            started_at=utcnow() - timedelta(minutes=60),
            outcome=PollOutcome.RUNNING,
        )
        db.add(dead)
        db.commit()
        result = poll_within(60, account.id)

    db.expire_all()
    closed = db.get(PollRun, dead.id)
    assert closed is not None and closed.finished_at is not None
    assert closed.outcome == PollOutcome.INTERNAL_ERROR
    assert "never finished" in (closed.error or "")
    refreshed = db.get(Account, account.id)
    assert refreshed is not None
    if failures_before == 0:
        # A worker killed once (out of memory, a lost host) is no reason to wait an
        # interval: the poll that found it goes on, and succeeds.
        assert result.outcome == PollOutcome.SUCCESS
        assert refreshed.consecutive_failures == 0 and refreshed.backoff_until is None
    else:
        # Killed again: the mailbox backs off like any failing one, from this poll on.
        assert refreshed.consecutive_failures == 2 and refreshed.backoff_until is not None
        assert result.outcome == PollOutcome.SKIPPED


def test_a_logout_that_hangs_holds_up_only_the_poll_that_let_its_session_go(
    db: Session, set_env: Callable[..., None]
) -> None:
    """Sessions let go are logged out by closing threads while their polls record
    themselves: a server that never answers LOGOUT keeps its own poll waiting (until the
    read timeout), and a poll of another mailbox in another thread ends meanwhile."""
    set_env(IMAP_POOL_SIZE=0)  # every poll lets its own session go
    at_logout = threading.Event()
    release = threading.Event()

    def respond(_tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"LOGOUT"):
            at_logout.set()
            release.wait(60)
        return None

    with (
        FakeImapServer([FakeMessage(1, raw(1))], respond=respond) as hanging,
        FakeImapServer([FakeMessage(1, raw(1))]) as answering,
    ):
        stuck = account_on(db, hanging)
        other = account_on(db, answering)
        results: dict[int, PollResult] = {}

        def poll(account_id: int) -> None:
            results[account_id] = poll_account(account_id)

        threads = [threading.Thread(target=poll, args=(a.id,)) for a in (stuck, other)]
        threads[0].start()
        assert at_logout.wait(30)
        threads[1].start()
        threads[1].join(30)
        try:
            assert not threads[1].is_alive() and results[other.id].messages == 1
            assert threads[0].is_alive()  # its LOGOUT is still unanswered
        finally:
            release.set()
            threads[0].join(30)
        assert results[stuck.id].messages == 1
