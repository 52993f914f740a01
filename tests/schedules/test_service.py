from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from redbeat.decoder import RedBeatJSONDecoder, RedBeatJSONEncoder
from redbeat.schedulers import RedBeatSchedulerEntry
from sqlalchemy.orm import Session

from backend import dispatch
from backend.celery_app import app
from backend.db import get_sessionmaker
from backend.models import AccountStatus, utcnow
from backend.schedules import service, store
from tests.support.accounts import make_account, make_accounts
from tests.support.net import free_port
from tests.support.redis_db import RedisDb


def _hash(redis_db: RedisDb, account_id: int) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], redis_db.client().hgetall(store.entry_key(account_id)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def _score(redis_db: RedisDb, account_id: int) -> float | None:
    return redis_db.client().zscore(store.schedule_key(), store.entry_key(account_id))


def _last_run_at(redis_db: RedisDb, account_id: int) -> datetime:
    meta = json.loads(_hash(redis_db, account_id)["meta"], cls=RedBeatJSONDecoder)
    value = meta["last_run_at"]
    assert isinstance(value, datetime)
    return value


def _set_last_run_at(redis_db: RedisDb, account_id: int, when: datetime) -> None:
    """What beat writes after it dispatched the entry."""
    meta = json.dumps({"last_run_at": when, "total_run_count": 1}, cls=RedBeatJSONEncoder)
    redis_db.client().hset(store.entry_key(account_id), "meta", meta)


def test_sync_creates_the_entry_beat_reads(db: Session, redis_db: RedisDb) -> None:
    account = make_account(db, poll_interval_seconds=120)
    before = utcnow()
    service.sync_account(account)

    entry = RedBeatSchedulerEntry.from_key(store.entry_key(account.id), app=app)
    assert entry.name == f"mailbox:{account.id}"
    assert entry.task == "mailbox.poll"
    assert entry.args == [account.id]
    # Priority 5 travels as kombu's level 4 (kombu pops lower levels first).
    # No `expires`: beat coalesces instead (one waiting poll per mailbox).
    assert entry.options == {"queue": "email", "priority": 4}
    assert entry.schedule.run_every == timedelta(seconds=120)
    assert entry.enabled
    # A new mailbox is due at once, and the score says so.
    score = _score(redis_db, account.id)
    assert score is not None
    assert before.timestamp() - 1 <= score <= utcnow().timestamp() + 1
    # Beat sends a mailbox's poll when its score comes: the exact next run (RedBeat's
    # whole seconds would send it up to a second early).
    due = entry.last_run_at + timedelta(seconds=120)
    assert score == due.timestamp()
    assert entry.is_due()[0] is True


def test_priority_orders_the_broker_levels(db: Session, redis_db: RedisDb) -> None:
    urgent = make_account(db, poll_interval_seconds=60, priority=9)
    idle = make_account(db, poll_interval_seconds=60, priority=0)
    service.sync_account(urgent)
    service.sync_account(idle)
    options = {
        account.id: RedBeatSchedulerEntry.from_key(store.entry_key(account.id), app=app).options
        for account in (urgent, idle)
    }
    assert options[urgent.id]["priority"] == 0
    assert options[idle.id]["priority"] == 9
    # A priority change rewrites the entry in place, keeping its phase.
    last_run = _last_run_at(redis_db, idle.id)
    idle.priority = 7
    db.commit()
    service.sync_account(idle)
    entry = RedBeatSchedulerEntry.from_key(store.entry_key(idle.id), app=app)
    assert entry.options["priority"] == 2
    assert _last_run_at(redis_db, idle.id) == last_run


def test_interval_change_updates_in_place_keeping_the_phase(db: Session, redis_db: RedisDb) -> None:
    account = make_account(db, poll_interval_seconds=300)
    service.sync_account(account)
    last_run = (utcnow() - timedelta(seconds=100)).replace(microsecond=0)
    _set_last_run_at(redis_db, account.id, last_run)

    account.poll_interval_seconds = 600
    db.commit()
    service.sync_account(account)

    entry = RedBeatSchedulerEntry.from_key(store.entry_key(account.id), app=app)
    assert entry.schedule.run_every == timedelta(seconds=600)
    assert _last_run_at(redis_db, account.id) == last_run
    assert _score(redis_db, account.id) == (last_run + timedelta(seconds=600)).timestamp()

    # Shorter than the time already passed: due at once, still from the same last run.
    account.poll_interval_seconds = 60
    db.commit()
    service.sync_account(account)
    assert _last_run_at(redis_db, account.id) == last_run
    score = _score(redis_db, account.id)
    assert score is not None
    assert score <= utcnow().timestamp()


@pytest.mark.parametrize(
    "change", [{"enabled": False}, {"status": "disabled"}], ids=["disabled", "status-disabled"]
)
def test_disabling_removes_and_reenabling_restores(
    db: Session, redis_db: RedisDb, change: dict[str, object]
) -> None:
    account = make_account(db)
    service.sync_account(account)
    assert _score(redis_db, account.id) is not None

    for name, value in change.items():
        setattr(account, name, value)
    db.commit()
    service.sync_account(account)
    assert _score(redis_db, account.id) is None
    assert not redis_db.client().exists(store.entry_key(account.id))

    account.enabled, account.status = True, AccountStatus.ACTIVE
    db.commit()
    service.sync_account(account)
    assert _score(redis_db, account.id) is not None


def test_a_failing_account_keeps_its_entry(db: Session, redis_db: RedisDb) -> None:
    account = make_account(db, status="error", consecutive_failures=3)
    service.sync_account(account)
    assert _score(redis_db, account.id) is not None


def test_remove_account(db: Session, redis_db: RedisDb) -> None:
    account = make_account(db)
    service.sync_account(account)
    service.remove_account(account.id)
    assert _score(redis_db, account.id) is None
    assert not redis_db.client().exists(store.entry_key(account.id))
    service.remove_account(account.id)  # already gone: nothing to do, no error


def test_a_recently_polled_account_keeps_its_phase(db: Session, redis_db: RedisDb) -> None:
    polled = (utcnow() - timedelta(seconds=20)).replace(microsecond=0)
    account = make_account(db, poll_interval_seconds=60, last_polled_at=polled)
    service.sync_account(account)
    assert _last_run_at(redis_db, account.id) == polled
    assert _score(redis_db, account.id) == (polled + timedelta(seconds=60)).timestamp()


def test_many_new_entries_are_spread_over_their_interval(db: Session, redis_db: RedisDb) -> None:
    accounts = make_accounts(db, 1000, poll_interval_seconds=100)
    start = utcnow().timestamp()
    assert service.reconcile(db).created == 1000
    members = cast(
        list[tuple[bytes, float]],
        redis_db.client().zrange(store.schedule_key(), 0, -1, withscores=True),
    )
    offsets = [score - start for key, score in members if b"mailbox:" in key]
    assert len(offsets) == len(accounts)
    assert all(-1 <= offset <= 101 for offset in offsets)
    per_tenth = Counter(min(max(int(offset // 10), 0), 9) for offset in offsets)
    # 100 per tenth of the interval if perfectly even; never a pile-up.
    assert len(per_tenth) == 10
    assert max(per_tenth.values()) < 150
    assert max(Counter(int(offset) for offset in offsets).values()) < 30


def test_reconcile_creates_fixes_and_deletes(db: Session, redis_db: RedisDb) -> None:
    kept, changed, missing, dropped, disabled = make_accounts(db, 5)
    for account in (kept, changed, dropped, disabled):
        service.sync_account(account)
    last_run = (utcnow() - timedelta(seconds=30)).replace(microsecond=0)
    _set_last_run_at(redis_db, changed.id, last_run)
    # Changed behind the schedule's back (as if the sync after the commit had failed).
    changed.poll_interval_seconds = 90
    disabled.enabled = False
    db.delete(dropped)
    db.commit()
    orphan = 987_654  # an entry left for an account that no longer exists
    store.apply({orphan: store.Wanted(orphan, 60, None)}, [], utcnow())

    result = service.reconcile(db)

    assert result.as_dict() == {"created": 1, "updated": 1, "deleted": 3, "unchanged": 1}
    entries = {entry.account_id: entry for entry in service.list_entries()}
    assert set(entries) == {kept.id, changed.id, missing.id}
    assert entries[changed.id].interval == 90
    assert entries[changed.id].last_run_at == last_run
    assert entries[changed.id].next_run_at == last_run + timedelta(seconds=90)
    assert service.reconcile(db).as_dict() == {
        "created": 0,
        "updated": 0,
        "deleted": 0,
        "unchanged": 3,
    }


def test_reconcile_in_pages_and_chunks(
    db: Session, redis_db: RedisDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages of 2 accounts from the database, 3 entries per comparison in Redis.
    monkeypatch.setattr(service, "RECONCILE_PAGE", 2)
    monkeypatch.setattr(store, "CHECK_CHUNK", 3)
    accounts = make_accounts(db, 7)
    assert service.reconcile(db).as_dict() == {
        "created": 7,
        "updated": 0,
        "deleted": 0,
        "unchanged": 0,
    }
    changed, dropped = accounts[1], accounts[4]
    changed.poll_interval_seconds = 90
    db.delete(dropped)
    db.commit()
    store.apply({987_654: store.Wanted(987_654, 60, None)}, [], utcnow())  # an orphan

    assert service.reconcile(db).as_dict() == {
        "created": 0,
        "updated": 1,
        "deleted": 2,
        "unchanged": 5,
    }
    entries = {entry.account_id: entry.interval for entry in service.list_entries()}
    assert entries == {
        account.id: 90 if account is changed else 60
        for account in accounts
        if account is not dropped
    }


def test_an_entry_added_while_a_reconcile_runs_is_kept(
    db: Session, redis_db: RedisDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RECONCILE_PAGE", 2)
    make_accounts(db, 5)
    pages = service.wanted_pages
    added: list[int] = []

    def pages_then_an_account_added(session: Session) -> Iterator[dict[int, store.Wanted]]:
        for page in pages(session):
            yield page
            if not added:
                # Another request creates an account and its entry meanwhile.
                other = get_sessionmaker()()
                try:
                    account = make_account(other)
                    service.sync_account(account)
                    added.append(account.id)
                finally:
                    other.close()

    monkeypatch.setattr(service, "wanted_pages", pages_then_an_account_added)
    service.reconcile(db)

    assert added
    assert _score(redis_db, added[0]) is not None
    assert added[0] in {entry.account_id for entry in service.list_entries()}


def test_reconcile_repairs_damaged_entries(db: Session, redis_db: RedisDb) -> None:
    unscored, garbled, no_definition = make_accounts(db, 3)
    service.reconcile(db)
    conn = redis_db.client()
    conn.zrem(store.schedule_key(), store.entry_key(unscored.id))
    conn.hset(store.entry_key(garbled.id), "definition", "{not json")
    conn.hdel(store.entry_key(no_definition.id), "definition")

    assert service.reconcile(db).as_dict() == {
        "created": 1,
        "updated": 2,
        "deleted": 0,
        "unchanged": 0,
    }
    for account in (unscored, garbled, no_definition):
        entry = RedBeatSchedulerEntry.from_key(store.entry_key(account.id), app=app)
        assert entry.args == [account.id]
        assert _score(redis_db, account.id) is not None


def test_reconcile_leaves_other_entries_alone(db: Session, redis_db: RedisDb) -> None:
    static = RedBeatSchedulerEntry(
        "schedules.reconcile", "schedules.reconcile", timedelta(seconds=300), app=app
    ).save()
    make_accounts(db, 2)
    assert service.reconcile(db).created == 2
    assert redis_db.client().zscore(store.schedule_key(), static.key) is not None


def test_list_entries(db: Session, redis_db: RedisDb) -> None:
    first, second = make_accounts(db, 2, poll_interval_seconds=45)
    service.reconcile(db)
    entries = service.list_entries()
    assert [entry.account_id for entry in entries] == sorted([first.id, second.id])
    for entry in entries:
        assert entry.name == f"mailbox:{entry.account_id}"
        assert entry.interval == 45
        assert entry.last_run_at is not None
        assert entry.next_run_at == entry.last_run_at + timedelta(seconds=45)


def test_enqueue_poll_sends_to_the_email_queue(db: Session, redis_db: RedisDb) -> None:
    account = make_account(db)
    task_id = service.enqueue_poll(account.id)
    raw = redis_db.client().lrange("email", 0, -1)
    assert len(raw) == 1
    headers = json.loads(raw[0])["headers"]
    assert headers["task"] == "mailbox.poll"
    assert headers["id"] == task_id
    assert headers["argsrepr"] == f"[{account.id}]"


def test_mode(set_env: Callable[..., None], caplog: pytest.LogCaptureFixture) -> None:
    assert dispatch.mode() == "celery"
    set_env(SCHEDULER_MODE="local")
    assert dispatch.mode() == "local"
    set_env(SCHEDULER_MODE="auto", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="backend.dispatch"):
        assert dispatch.mode() == "local"
    assert "cannot be reached" in caplog.text
    assert "local in-process scheduler" in caplog.text


def test_initial_phase_is_fixed_by_the_id() -> None:
    from backend.schedules.phase import initial_last_run

    now = datetime(2026, 1, 1, tzinfo=UTC)
    first = initial_last_run(7, 60, None, now)
    assert first == initial_last_run(7, 60, None, now)
    assert now - timedelta(seconds=60) <= first < now
    # Polled long ago: no phase to keep.
    assert initial_last_run(7, 60, now - timedelta(hours=1), now) == first


def test_entries_are_written_in_redbeats_own_encoding() -> None:
    from celery.schedules import schedule

    when = datetime(2026, 11, 23, 18, 30, 5, 123456, tzinfo=UTC)
    assert store.meta_json(when) == json.dumps({"last_run_at": when}, cls=RedBeatJSONEncoder)
    definition = json.loads(store.definition_json(7, 90))
    definition["schedule"] = schedule(run_every=timedelta(seconds=90))
    assert store.definition_json(7, 90) == json.dumps(definition, cls=RedBeatJSONEncoder)
