"""The connection budget per host (backend/mailbox/budget.py) against real Redis and the
Dovecot fixture behind a proxy that counts connections (tests/support/imap_proxy.py)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.audit import service as audits
from backend.celery_app import queue_keys
from backend.mailbox import budget, pool
from backend.mailbox.imap import ImapThrottled
from backend.mailbox.service import PollResult, open_held, poll_account
from backend.models import Account, AuditOutcome, Backfill, BackfillStatus, Message
from backend.processing import backfill
from backend.push.held import reconnect_delay
from backend.schedules import store
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot
from tests.support.imap_proxy import ImapProxy
from tests.support.mail import generated
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for

HOST = "127.0.0.1"  # the proxy's


def passthrough(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
    return None


def limit(set_env: Callable[..., None], slots: int, **more: object) -> None:
    set_env(CONNECTION_LIMITS=json.dumps({HOST: slots}), **more)


def mailbox(
    db: Session, dovecot: Dovecot, proxy: ImapProxy, messages: int, **values: Any
) -> Account:
    """A mailbox on the Dovecot fixture reached through the proxy, with `messages` in it."""
    account = make_account(db, dovecot, imap_host=proxy.host, imap_port=proxy.port, **values)
    if messages:
        dovecot.append_many(account.username, [generated(index) for index in range(messages)])
    return account


def sent(redis_db: RedisDb, task: str) -> list[list[Any]]:
    """The arguments of each `task` waiting on the email queue."""
    client = redis_db.client()
    headers = [
        json.loads(message)["headers"]
        for key in queue_keys("email")
        for message in client.lrange(key, 0, -1)
    ]
    return [ast.literal_eval(h["argsrepr"]) for h in headers if h["task"] == task]


def stored(db: Session, account: Account) -> int:
    db.rollback()
    return len(db.scalars(select(Message.id).where(Message.account_id == account.id)).all())


def test_the_limit_holds_across_polls_a_backfill_and_kept_sessions(
    db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    limit(set_env, 2)

    def slow(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        # Every fetch takes a while: without the budget the connectors overlap.
        if b"FETCH" in command.upper():
            threading.Event().wait(0.05)
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, slow) as proxy:
        polled = [mailbox(db, dovecot, proxy, 40) for _ in range(3)]
        filled = mailbox(db, dovecot, proxy, 40)
        row = backfill.create(db, filled.id, {})
        db.commit()
        results: list[PollResult | str] = []
        threads = [
            threading.Thread(target=lambda a=a: results.append(poll_account(a.id))) for a in polled
        ]
        threads.append(threading.Thread(target=lambda: results.append(backfill.run(row.id))))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert all(isinstance(r, str) or r.outcome == "success" for r in results), results
        assert [stored(db, a) for a in [*polled, filled]] == [40, 40, 40, 40]
        assert proxy.most == 2, proxy.most
    db.rollback()
    done = db.get(Backfill, row.id)
    assert done is not None and done.status == BackfillStatus.DONE


def test_a_poll_waits_for_a_slot_and_polls_once_one_frees(
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
    redis_db: RedisDb,
) -> None:
    limit(set_env, 1, CONNECTION_SLOT_WAIT_SECONDS=120)
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        account = mailbox(db, dovecot, proxy, 3)
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None
        results: list[PollResult] = []
        poll = threading.Thread(target=lambda: results.append(poll_account(account.id)))
        poll.start()
        # It says it waits: the note that asks holders to let go of idle sessions.
        wait_for(lambda: redis_db.client().exists(budget.WANTED_PREFIX + HOST), "the poll's wait")
        assert proxy.most == 0 and poll.is_alive()

        held.release()
        poll.join()

    assert (results[0].outcome, results[0].messages) == ("success", 3)


def test_a_poll_whose_wait_runs_out_is_no_failure_and_is_sent_again(
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
    redis_db: RedisDb,
) -> None:
    from backend.mailbox.polling import run_poll

    limit(set_env, 1, CONNECTION_SLOT_WAIT_SECONDS=0, MAX_CONSECUTIVE_FAILURES=1)
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        account = mailbox(db, dovecot, proxy, 2)
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None

        result = run_poll(account.id, None)

        assert isinstance(result, PollResult)
        assert result.outcome == "no_slot"
        assert result.error is not None
        assert f"waiting for a connection slot: {HOST} has 1 of 1" in result.error
        db.refresh(account)
        assert (account.status, account.enabled, account.consecutive_failures) == (
            "active",
            True,
            0,
        )
        assert (account.last_error, account.backoff_until) == (None, None)
        # Sent again (countdown), coalesced like any poll of the mailbox.
        assert redis_db.client().exists(dispatch.COALESCE_PREFIX + store.pending_key(account.id))

        held.release()
        again = run_poll(account.id, None)
        assert isinstance(again, PollResult)
        assert (again.outcome, again.messages) == ("success", 2)


def test_a_backfill_without_a_slot_waits_queued_and_is_sent_again(
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
    redis_db: RedisDb,
) -> None:
    limit(set_env, 1, CONNECTION_SLOT_WAIT_SECONDS=0)
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        account = mailbox(db, dovecot, proxy, 2)
        row = backfill.create(db, account.id, {})
        db.commit()
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None

        assert backfill.run(row.id) == "queued"

        db.refresh(row)
        assert row.status == BackfillStatus.QUEUED
        assert row.error is not None and row.error.startswith("waiting for a connection slot")
        assert sent(redis_db, backfill.RUN_TASK) == [[row.id]]

        held.release()
        assert backfill.run(row.id) == "done"
        db.refresh(row)
        assert row.error is None and str(row.status) == "done"
        assert stored(db, account) == 2


def test_an_audit_without_a_slot_is_skipped_saying_so_and_sent_again(
    db: Session,
    dovecot: Dovecot,
    set_env: Callable[..., None],
    redis_db: RedisDb,
) -> None:
    limit(set_env, 1, CONNECTION_SLOT_WAIT_SECONDS=0)
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        account = mailbox(db, dovecot, proxy, 2)
        assert poll_account(account.id).outcome == "success"
        pool.clear()
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None

        assert audits.run(account.id) == "no_slot"

        [folder] = audits.latest(db, account.id)
        assert folder.outcome == AuditOutcome.SKIPPED
        assert folder.error is not None
        assert folder.error.startswith("waiting for a connection slot")
        assert sent(redis_db, audits.RUN_TASK) == [[account.id, False]]

        held.release()
        assert audits.run(account.id) == "clean"
        db.expire_all()
        [folder] = audits.latest(db, account.id)
        assert (folder.outcome, folder.error) == (AuditOutcome.COMPLETE, None)


def test_a_connection_test_takes_a_slot_and_says_when_the_budget_is_full(
    api: TestClient, db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    limit(set_env, 1, IMAP_CONNECT_TIMEOUT=1)  # the check's wait for a slot: 1 s
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        account = mailbox(db, dovecot, proxy, 1)
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None

        full = api.post(f"/accounts/{account.id}/test").json()

        assert (full["ok"], full["stage"]) == (False, "budget")
        assert f"the connection budget for {HOST} is full" in full["detail"]
        assert "nothing of the login" in full["detail"]
        assert proxy.most == 0
        db.refresh(account)
        assert (account.status, account.last_error) == ("active", None)

        held.release()
        tried = api.post(f"/accounts/{account.id}/test").json()
        assert (tried["ok"], tried["folders"][0]["messages"]) == (True, 1)
        assert budget.in_use(HOST) == 0  # released as the check's session closed


def test_a_kept_session_lets_go_of_its_slot_for_a_waiting_poll(
    db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    limit(set_env, 1, CONNECTION_SLOT_WAIT_SECONDS=60)
    with ImapProxy(dovecot.host, dovecot.imap_port, passthrough) as proxy:
        first = mailbox(db, dovecot, proxy, 1)
        second = mailbox(db, dovecot, proxy, 1)
        assert poll_account(first.id).outcome == "success"
        assert pool.kept() == 1 and budget.in_use(HOST) == 1

        assert poll_account(second.id).outcome == "success"

        assert proxy.most == 1


def test_a_dead_holders_slot_heals_after_its_lease(
    set_env: Callable[..., None], redis_db: RedisDb
) -> None:
    set_env(CONNECTION_LIMITS=json.dumps({"h.example": 1}), CONNECTION_SLOT_SECONDS=2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from backend.mailbox import budget\n"
            "assert budget.claim('h.example', 'u', 'test') is not None\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        client = redis_db.client()
        key = budget.HOST_PREFIX + "h.example"
        [(member, first_expiry)] = cast(
            list[tuple[bytes, float]], client.zrange(key, 0, 0, withscores=True)
        )
        # Alive, it renews: its slot outlives the first expiry and stays taken.
        wait_for(lambda: (client.zscore(key, member) or 0) > first_expiry + 1000, "a renewal")
        assert budget.claim("h.example", "v", "test") is None
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

        slot = wait_for(lambda: budget.claim("h.example", "v", "test"), "the slot healed")
        assert client.zscore(key, member) is None
        slot.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_throttled_mailbox_slows_the_hosts_others(
    db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    set_env(CONNECTION_SLOT_WAIT_SECONDS=0, THROTTLE_BACKOFF_SECONDS=600)

    def busy(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"STATUS") and b"Busy" in command:
            return tag + b" NO [UNAVAILABLE] Too many simultaneous connections\r\n"
        return None

    with ImapProxy(dovecot.host, dovecot.imap_port, busy) as proxy:
        throttled = mailbox(db, dovecot, proxy, 0, folders=["Busy"])
        other = mailbox(db, dovecot, proxy, 2)
        held = budget.claim(HOST, "someone-else", "test")
        assert held is not None
        # Before: the host takes a second connection.
        assert poll_account(other.id).outcome == "success"
        pool.clear()

        assert poll_account(throttled.id).outcome == "throttled_error"
        until = budget.throttled_until(HOST)
        assert until is not None

        # Now one connection at a time: the other mailbox waits its turn, no failure.
        result = poll_account(other.id, force=True)
        assert result.outcome == "no_slot"
        assert result.error is not None and "throttled by the server" in result.error
        db.refresh(other)
        assert (other.status, other.consecutive_failures, other.last_error) == ("active", 0, None)

        held.release()
        dovecot.append(other.username, generated(9))
        last = poll_account(other.id, force=True)
        assert (last.outcome, last.messages) == ("success", 1), last.error


def test_local_mode_keeps_the_same_budget_in_memory(
    set_env: Callable[..., None], redis_db: RedisDb
) -> None:
    set_env(SCHEDULER_MODE="local", CONNECTION_LIMITS=json.dumps({"h.example": 2}))
    first = budget.claim("h.example", "a", "test")
    second = budget.claim("H.example.", "b", "test")
    assert first is not None and second is not None
    assert budget.claim("h.example", "c", "test") is None
    first.release()
    first.release()  # once only
    assert budget.in_use("h.example") == 1

    budget.throttled("h.example", 600)
    assert budget.throttled_until("h.example") is not None
    assert budget.claim("h.example", "c", "test") is None  # one at a time now
    second.release()
    assert budget.claim("h.example", "c", "test") is not None
    assert redis_db.client().keys("mailbeat:budget:*") == []


def test_a_provider_caps_one_login(set_env: Callable[..., None]) -> None:
    # QQ: a few per login, more for the host as a whole.
    slots = [budget.claim("imap.qq.com", "same", "test") for _ in range(5)]
    assert [slot is not None for slot in slots] == [True] * 4 + [False]
    assert budget.claim("imap.qq.com", "another", "test") is not None


def test_a_long_lived_holder_leaves_a_slot_to_the_polls(set_env: Callable[..., None]) -> None:
    set_env(CONNECTION_LIMITS=json.dumps({"h.example": 3}))
    watching = [budget.claim("h.example", f"w{i}", "watch", leave=1) for i in range(3)]
    assert [slot is not None for slot in watching] == [True, True, False]
    assert budget.claim("h.example", "p", "poll") is not None  # the one left
    assert budget.claim("h.example", "q", "poll") is None


def test_a_connection_held_for_good_waits_out_a_throttle(
    db: Session, dovecot: Dovecot, set_env: Callable[..., None]
) -> None:
    """IDLE and held checks (backend/push) open through `open_held` and back off through
    `reconnect_delay`: a throttle answer marks the host and is waited out, and no such
    connection is opened while the host is throttled (it would take the one left)."""
    set_env(THROTTLE_BACKOFF_SECONDS=600)
    account = make_account(db, dovecot)
    with open_held(account, "held") as session:  # before: it opens
        assert session.supports_idle()

    answer = ImapThrottled("BYE [UNAVAILABLE] busy", stage="connect", retry_after=120)
    assert reconnect_delay(1, answer, account.imap_host) >= 120
    assert budget.throttled_until(account.imap_host) is not None
    with pytest.raises(ImapThrottled, match="waiting its turn"):
        open_held(account, "held")
    assert budget.in_use(account.imap_host) == 0
