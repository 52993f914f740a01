"""The beat scheduler in this process (the real beat runs in tests/e2e)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
from sqlalchemy.orm import Session

from backend import dispatch
from backend.celery_app import app, queue_keys
from backend.models import Account
from backend.schedules import beat, service, store
from backend.schedules.beat import MailbeatScheduler, take_lock
from tests.support.accounts import make_accounts
from tests.support.redis_db import RedisDb


@pytest.fixture(autouse=True)
def _keep_sent_events() -> Iterator[None]:
    # The scheduler turns task-sent events off in its (beat) process; not in this one.
    before = app.conf.task_send_sent_event
    yield
    app.conf.task_send_sent_event = before


@pytest.fixture
def scheduler() -> Iterator[MailbeatScheduler]:
    instance = MailbeatScheduler(app=app)
    yield instance
    instance.close()


def _mailbox_entries() -> set[int]:
    return {entry.account_id for entry in service.list_entries()}


def test_beat_start_reconciles(db: Session, redis_db: RedisDb) -> None:
    accounts = make_accounts(db, 3)
    instance = MailbeatScheduler(app=app)
    try:
        assert _mailbox_entries() == {account.id for account in accounts}
        # The periodic reconcile is a static entry of the same schedule.
        assert redis_db.client().zscore(store.schedule_key(), "redbeat:schedules.reconcile")
    finally:
        instance.close()


def test_an_emptied_redis_is_rebuilt_on_the_next_check(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler
) -> None:
    accounts = make_accounts(db, 3)
    scheduler._reconcile("test")
    redis_db.client().flushdb()

    scheduler._rebuild_if_empty()

    assert _mailbox_entries() == {account.id for account in accounts}
    assert redis_db.client().zscore(store.schedule_key(), "redbeat:schedules.reconcile")


def test_a_lost_beat_lock_is_taken_again(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler
) -> None:
    make_accounts(db, 2)
    take_lock(scheduler)
    assert scheduler.lock is not None and scheduler.lock.owned()
    redis_db.client().flushdb()

    scheduler.tick()  # RedBeat alone raises LockNotOwnedError here

    assert scheduler.lock.owned()
    assert len(_mailbox_entries()) == 2


def test_a_beat_without_the_lock_takes_it_before_dispatching(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler
) -> None:
    # beat_init could not take the lock (Redis was down): the first tick takes it.
    assert scheduler.lock is None
    scheduler.tick()
    assert scheduler.lock is not None and scheduler.lock.owned()


def test_a_waiting_beat_says_so_and_takes_over_once_the_lock_runs_out(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    take_lock(scheduler)
    ttl = redis_db.client().ttl("redbeat::lock")
    assert 0 < ttl <= 15  # short: a dead beat's lock runs out in seconds
    redis_db.client().pexpire("redbeat::lock", 1500)  # as if its holder had died a while ago
    other = MailbeatScheduler(app=app)
    try:
        take_lock(other)
        assert other.lock is not None and other.lock.owned()
        assert "waiting for the beat lock redbeat::lock" in caplog.text
    finally:
        other.close()


def _queued_polls(redis_db: RedisDb) -> list[int]:
    """The account ids of the polls waiting in the email queue."""
    conn = redis_db.client()
    raws = [raw for key in queue_keys(store.POLL_QUEUE) for raw in conn.lrange(key, 0, -1)]
    return [json.loads(json.loads(raw)["headers"]["argsrepr"])[0] for raw in raws]


def _all_due(redis_db: RedisDb, accounts: list[Account]) -> None:
    past = time.time() - 30
    redis_db.client().zadd(
        store.schedule_key(), {store.entry_key(account.id): past for account in accounts}
    )


def test_a_backlog_is_sent_in_passes_each_poll_once(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(beat, "DUE_BATCH", 5)
    accounts = make_accounts(db, 12, poll_interval_seconds=600)
    scheduler._reconcile("test")
    _all_due(redis_db, accounts)  # as after a beat was down for a while
    take_lock(scheduler)

    assert scheduler.tick() == 0.0  # a full pass: the tick comes back at once
    assert len(_queued_polls(redis_db)) <= 5
    for _ in range(10):
        if scheduler.tick() > 0:
            break

    assert sorted(_queued_polls(redis_db)) == sorted(account.id for account in accounts)
    conn = redis_db.client()
    for account in accounts:
        score = conn.zscore(store.schedule_key(), store.entry_key(account.id))
        assert score is not None and score > time.time() + 500  # one interval on


def test_an_unreadable_entry_is_left_to_reconcile_and_the_others_are_sent(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler
) -> None:
    garbled, *others = make_accounts(db, 3)
    scheduler._reconcile("test")
    redis_db.client().hset(store.entry_key(garbled.id), "definition", "{not json")
    _all_due(redis_db, [garbled, *others])
    take_lock(scheduler)

    scheduler.tick()

    assert sorted(_queued_polls(redis_db)) == sorted(account.id for account in others)
    conn = redis_db.client()
    assert conn.zscore(store.schedule_key(), store.entry_key(garbled.id)) is None
    scheduler._reconcile("test")
    assert conn.zscore(store.schedule_key(), store.entry_key(garbled.id)) is not None


@pytest.mark.parametrize(
    ("late_by", "next_in"),
    [
        (0.0, 600.0),  # on time: one interval on
        (8.0, 592.0),  # sent late: still one interval after it was due
        (150.0, 450.0),
        (151.0, 1049.0),  # the next would follow too soon: it is skipped, in phase
        (599.0, 601.0),
        (1500.0, 900.0),  # runs missed entirely are not made up; the phase is kept
    ],
)
def test_the_next_run_keeps_the_phase_of_the_run_that_was_due(
    late_by: float, next_in: float
) -> None:
    now = 1_000_000.0
    assert beat.next_run(now - late_by, 600, now) == pytest.approx(now + next_in, abs=1e-6)


def test_entries_sent_late_spread_out_again_as_they_were_due(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler
) -> None:
    accounts = make_accounts(db, 3, poll_interval_seconds=600)
    scheduler._reconcile("test")
    now = time.time()
    due = {account.id: now - 5 - 2 * index for index, account in enumerate(accounts)}
    conn = redis_db.client()
    conn.zadd(store.schedule_key(), {store.entry_key(a): when for a, when in due.items()})
    take_lock(scheduler)

    scheduler.tick()  # all three go in one pass, seconds late

    assert sorted(_queued_polls(redis_db)) == sorted(due)
    for account_id, when in due.items():
        score = conn.zscore(store.schedule_key(), store.entry_key(account_id))
        assert score == pytest.approx(when + 600, abs=0.01)


def test_a_mailbox_whose_queued_poll_was_lost_is_polled_again(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler, set_env: Callable[..., None]
) -> None:
    set_env(MAILBOX_LEASE_SECONDS=1)
    lost, waiting = make_accounts(db, 2, poll_interval_seconds=600)
    scheduler._reconcile("test")
    expiry = store.pending_seconds()
    # `waiting`'s poll has been in the queue for 5 s (the workers are behind): its key
    # holds the mailbox. `lost`'s key was claimed 10 s ago, before any poll now in the
    # queue was sent, so its poll is not in the queue: it went with a Redis failover's
    # last writes (or with a worker that died).
    dispatch.enqueue(
        store.POLL_TASK,
        waiting.id,
        coalesce_key=store.pending_key(waiting.id),
        coalesce_expiry=expiry,
        headers={service.SENT_AT_HEADER: time.time() - 5},
    )
    assert dispatch.claim_many([store.pending_key(lost.id)], expiry) == [True]
    for account, age in ((lost, 10), (waiting, 5)):
        key = dispatch.COALESCE_PREFIX + store.pending_key(account.id)
        redis_db.client().pexpire(key, round((expiry - age) * 1000))
    _all_due(redis_db, [lost, waiting])
    take_lock(scheduler)

    scheduler.tick()

    # The lost one is polled again now, not once its key expires (1,320 s); the waiting
    # one still has one poll in the queue.
    assert sorted(_queued_polls(redis_db)) == sorted([lost.id, waiting.id])


def test_a_checked_mailbox_is_only_rescheduled_until_its_checks_stop(
    db: Session, redis_db: RedisDb, scheduler: MailbeatScheduler, set_env: Callable[..., None]
) -> None:
    """A held mailbox (a watcher's checks keep its `checked` key) gets no poll and no
    coalescing key at its due run, only its next run; once the key is gone (the watcher
    let it go or died), its next due run is sent as any other."""
    set_env(HELD_SAFETY_INTERVAL_SECONDS=100_000)
    held, other = make_accounts(db, 2, poll_interval_seconds=600)
    scheduler._reconcile("test")
    store.record_checks({held.id: 600}, time.time())
    _all_due(redis_db, [held, other])
    take_lock(scheduler)
    scheduler.tick()

    assert _queued_polls(redis_db) == [other.id]
    conn = redis_db.client()
    assert not conn.exists(dispatch.COALESCE_PREFIX + store.pending_key(held.id))
    score = conn.zscore(store.schedule_key(), store.entry_key(held.id))
    assert score is not None and score > time.time() + 500  # one interval on

    store.forget_check(held.id)
    _all_due(redis_db, [held])
    scheduler.tick()
    assert sorted(_queued_polls(redis_db)) == sorted([held.id, other.id])


def test_a_held_mailbox_gets_one_safety_poll_per_safety_interval() -> None:
    interval, safety = 10.0, 600.0
    for key in ("redbeat:mailbox:1", "redbeat:mailbox:2", "redbeat:mailbox:77"):
        runs = [1_000_000.0 + n * interval for n in range(int(6 * safety / interval))]
        sent = [due for due in runs if beat.safety_due(key, due, interval, safety)]
        assert len(sent) in (5, 6, 7)
        assert all(later - earlier == safety for earlier, later in pairwise(sent))
    assert beat.safety_due("redbeat:mailbox:1", 5.0, 600.0, 600.0)  # no wider than the interval
