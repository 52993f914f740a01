"""Scheduling end to end: real `celery beat` and `celery worker` processes, real Redis,
the Dovecot fixture. Intervals are a few seconds; every wait is a loop with a generous
deadline, never a sleep that asserts timing."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.celery_app import queue_keys
from backend.models import Account, AccountStatus, Message, PollOutcome, PollRun, utcnow
from backend.schedules import service
from tests.support.accounts import make_account
from tests.support.celery import Celery, running_celery
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.poll_queue import PollSink
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for

pytestmark = pytest.mark.e2e

INTERVAL = 2


@pytest.fixture
def celery(tmp_path: Path, set_env: Callable[..., None]) -> Iterator[Celery]:
    set_env(MIN_POLL_INTERVAL_SECONDS=1)
    with running_celery(tmp_path) as processes:
        yield processes


class Mailboxes:
    """Mailboxes on the Dovecot fixture with their accounts, created as the account
    service does: commit, then sync the schedule."""

    def __init__(self, db: Session, dovecot: Dovecot) -> None:
        self.db = db
        self.dovecot = dovecot
        self.usernames: dict[int, str] = {}
        self.sent: dict[int, int] = defaultdict(int)

    def add(
        self,
        *,
        interval: int = INTERVAL,
        wrong_password: bool = False,
        last_polled_at: datetime | None = None,
    ) -> Account:
        account = make_account(
            self.db,
            self.dovecot,
            poll_interval_seconds=interval,
            last_polled_at=last_polled_at,
            credentials={"password": "wrong"} if wrong_password else None,
        )
        service.sync_account(account)
        self.usernames[account.id] = account.username
        return account

    def deliver(self, account: Account, count: int) -> int:
        """Put `count` new messages in the mailbox; returns how many it holds now."""
        start = self.sent[account.id]
        raws = [generated(start + index) for index in range(count)]
        if count > 50:
            self.dovecot.write_maildir(self.usernames[account.id], raws)
        else:
            self.dovecot.append_many(self.usernames[account.id], raws)
        self.sent[account.id] += count
        return self.sent[account.id]

    def ingested(self, account: Account) -> int:
        self.db.rollback()  # a fresh snapshot
        return int(
            self.db.scalar(select(func.count(Message.id)).where(Message.account_id == account.id))
            or 0
        )

    def runs(self, account: Account, outcome: str | None = None) -> list[PollRun]:
        self.db.rollback()
        query = select(PollRun).where(PollRun.account_id == account.id)
        if outcome is not None:
            query = query.where(PollRun.outcome == outcome)
        return list(self.db.scalars(query.order_by(PollRun.id)))

    def assert_held_once(self, account: Account) -> None:
        """Every message in the mailbox is held exactly once."""
        self.db.rollback()
        uids = list(self.db.scalars(select(Message.uid).where(Message.account_id == account.id)))
        assert len(uids) == len(set(uids)) == self.sent[account.id]
        on_server = self.dovecot.folder_status(self.usernames[account.id])[b"MESSAGES"]
        assert on_server == len(uids)


@pytest.fixture
def mailboxes(db: Session, dovecot: Dovecot) -> Mailboxes:
    return Mailboxes(db, dovecot)


def sends(log: str, account: Account) -> int:
    """How many polls of the account beat's log says it sent."""
    return log.count(f"Sending due task mailbox:{account.id} (")


@pytest.fixture
def sink(redis_db: RedisDb) -> Iterator[PollSink]:
    """In place of workers: takes each poll beat sends off the queue (as a worker would,
    freeing its coalescing key) and records when it was sent."""
    with PollSink(redis_db.client()) as taken:
        yield taken


def test_accounts_are_polled_on_their_intervals_and_mail_ingested(
    celery: Celery, mailboxes: Mailboxes
) -> None:
    first, second = mailboxes.add(), mailboxes.add()
    mailboxes.deliver(first, 3)
    mailboxes.deliver(second, 2)
    celery.beat()
    celery.worker()

    wait_for(
        lambda: mailboxes.ingested(first) == 3 and mailboxes.ingested(second) == 2,
        "the first messages",
    )
    # Later mail arrives with later polls.
    mailboxes.deliver(first, 2)
    mailboxes.deliver(second, 2)
    wait_for(
        lambda: mailboxes.ingested(first) == 5 and mailboxes.ingested(second) == 4,
        "the later messages",
    )
    wait_for(
        lambda: all(len(mailboxes.runs(a, "success")) >= 3 for a in (first, second)),
        "repeated polls",
    )
    for account in (first, second):
        mailboxes.assert_held_once(account)


def test_an_interval_change_takes_effect_without_restarting_beat(
    celery: Celery, mailboxes: Mailboxes
) -> None:
    # Polled a moment ago, hourly: the next poll is an hour away.
    account = mailboxes.add(interval=3600, last_polled_at=utcnow())
    mailboxes.deliver(account, 2)
    beat = celery.beat()
    celery.worker()
    wait_for(lambda: "beat: Acquired lock" in beat.log(), "beat to run")
    assert sends(beat.log(), account) == 0

    account.poll_interval_seconds = INTERVAL
    mailboxes.db.commit()
    service.sync_account(account)

    wait_for(lambda: mailboxes.ingested(account) == 2, "the poll at the new interval")
    assert beat.running()
    assert beat.log().count("beat: Starting") == 1


def test_deleting_an_account_stops_its_polls(
    celery: Celery, mailboxes: Mailboxes, redis_db: RedisDb
) -> None:
    gone, staying = mailboxes.add(), mailboxes.add()
    beat = celery.beat()
    celery.worker()
    wait_for(
        lambda: len(mailboxes.runs(gone, "success")) >= 2 and mailboxes.runs(staying),
        "both polled",
    )

    mailboxes.db.delete(gone)
    mailboxes.db.commit()
    service.remove_account(gone.id)
    sent_before = sends(beat.log(), gone)
    polls_of_staying = len(mailboxes.runs(staying))

    # Three more polls of the other mailbox: several intervals have passed.
    wait_for(lambda: len(mailboxes.runs(staying)) >= polls_of_staying + 3, "the other's polls")
    # At most the one beat was sending as the entry went.
    assert sends(beat.log(), gone) <= sent_before + 1
    assert gone.id not in {entry.account_id for entry in service.list_entries()}
    assert not redis_db.client().exists(f"redbeat:mailbox:{gone.id}")


def test_two_beats_at_once_dispatch_each_poll_once(
    celery: Celery, mailboxes: Mailboxes, sink: PollSink
) -> None:
    accounts = [mailboxes.add() for _ in range(3)]
    # No worker: the sink takes the polls, and counts every dispatch.
    first = celery.beat("beat1")
    wait_for(lambda: "beat: Acquired lock" in first.log(), "the first beat")
    second = celery.beat("beat2")
    wait_for(lambda: "beat: reconciled the schedule" in second.log(), "the second beat")

    wait_for(
        lambda: all(len(sink.sent().get(a.id, [])) >= 4 for a in accounts),
        "four dispatches of every mailbox",
    )
    assert "Sending due task mailbox:" not in second.log()

    # The active beat stops; the other takes over, still without duplicates.
    first.stop()
    counts = {a.id: len(sink.sent()[a.id]) for a in accounts}
    wait_for(
        lambda: all(len(sink.sent()[a.id]) >= counts[a.id] + 3 for a in accounts),
        "dispatches from the second beat",
    )
    assert "Sending due task mailbox:" in second.log()
    for account in accounts:
        times = sink.sent()[account.id]
        gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(times)]
        # A duplicate would be milliseconds after the poll it repeats.
        assert min(gaps) >= INTERVAL / 2, (account.id, gaps)
        assert sends(first.log(), account) + sends(second.log(), account) == len(times)


def test_a_beat_killed_outright_is_replaced_within_seconds(
    celery: Celery, mailboxes: Mailboxes, redis_db: RedisDb, sink: PollSink
) -> None:
    accounts = [mailboxes.add() for _ in range(2)]
    first = celery.beat("beat1")
    wait_for(lambda: all(sink.sent().get(a.id) for a in accounts), "the first dispatches")

    first.kill()  # SIGKILL: the lock is not released
    assert redis_db.client().exists("redbeat::lock")
    killed = time.monotonic()
    second = celery.beat("beat2")
    counts = {a.id: len(sink.sent()[a.id]) for a in accounts}

    # The old lock runs out in seconds (it was 300 s), and the new beat says it waits.
    wait_for(
        lambda: all(len(sink.sent()[a.id]) > counts[a.id] for a in accounts),
        "dispatches from the new beat",
        timeout=30,
    )
    print(f"beat failover: {time.monotonic() - killed:.1f}s from SIGKILL to dispatch")
    assert "beat: waiting for the beat lock" in second.log()
    assert "Sending due task mailbox:" in second.log()


def test_two_workers_never_poll_one_mailbox_at_once(
    celery: Celery, mailboxes: Mailboxes, set_env: Callable[..., None]
) -> None:
    """Eight polls asked for at once on four worker processes: one holds the mailbox, the
    others find it busy and step aside. A poll that stepped aside leaves a rerun request,
    which the holder answers with one more poll as it lets go (a new task id, not one of
    the eight); a poll asked for after the holder let go takes the mailbox itself and
    answers the request instead. So the runs are the eight asked for plus at most one."""
    set_env(IMAP_FETCH_BATCH_SIZE=20)
    account = mailboxes.add(interval=3600, last_polled_at=utcnow())
    mailboxes.deliver(account, 400)
    workers = [celery.worker("w1", concurrency=2), celery.worker("w2", concurrency=2)]
    wait_for(lambda: all(" ready." in worker.log() for worker in workers), "the workers")

    task_ids = {service.enqueue_poll(account.id) for _ in range(8)}

    def settled() -> bool:
        runs = mailboxes.runs(account)
        finished = {run.task_id for run in runs if run.finished_at}
        return finished >= task_ids and all(run.finished_at for run in runs)

    wait_for(
        settled,
        "every requested poll to finish",
        timeout=180,
        details=lambda: "\n".join(
            [repr([(r.task_id, r.outcome, r.finished_at) for r in mailboxes.runs(account)])]
            + [worker.log()[-6000:] for worker in workers]
        ),
    )

    runs = mailboxes.runs(account)
    assert len(task_ids) <= len(runs) <= len(task_ids) + 1, runs
    held = [run for run in runs if run.error != "another poll of this mailbox is running"]
    assert len(held) < len(runs)  # some polls found the mailbox busy and stepped aside
    spans = sorted((run.started_at, run.finished_at) for run in held)
    for (_, end), (start, _) in pairwise(spans):
        assert end is not None and end <= start, spans
    mailboxes.assert_held_once(account)


def test_after_flushall_the_schedule_is_rebuilt_and_polling_resumes(
    celery: Celery, mailboxes: Mailboxes, redis_db: RedisDb
) -> None:
    account = mailboxes.add()
    mailboxes.deliver(account, 2)
    beat = celery.beat()
    celery.worker()
    wait_for(lambda: mailboxes.ingested(account) == 2, "the first messages")

    redis_db.client().flushdb()  # this test's Redis database only
    mailboxes.deliver(account, 2)

    wait_for(lambda: mailboxes.ingested(account) == 4, "polling to resume")
    assert "the schedule is missing from Redis" in beat.log()
    assert [entry.account_id for entry in service.list_entries()] == [account.id]
    assert beat.running()
    mailboxes.assert_held_once(account)


def test_a_worker_killed_mid_poll_loses_and_duplicates_nothing(
    celery: Celery, mailboxes: Mailboxes, set_env: Callable[..., None]
) -> None:
    # Short limits, so the dead worker's lock expires within the test.
    set_env(
        IMAP_FETCH_BATCH_SIZE=10,
        IMAP_CONNECT_TIMEOUT=3,
        IMAP_READ_TIMEOUT=5,
        POLL_SOFT_TIME_LIMIT_SECONDS=8,
        POLL_TIME_LIMIT_SECONDS=10,
    )
    account = mailboxes.add()
    total = mailboxes.deliver(account, 1500)
    celery.beat()
    worker = celery.worker("doomed")
    wait_for(lambda: mailboxes.ingested(account) > 0, "the poll to be under way")

    worker.kill()
    time.sleep(1)  # a COMMIT the dead worker had sent completes without it
    held_at_kill = mailboxes.ingested(account)
    assert held_at_kill < total, "the poll ended before the kill; use more mail"

    celery.worker("survivor")
    wait_for(lambda: mailboxes.ingested(account) == total, "the rest of the mailbox")
    mailboxes.assert_held_once(account)
    # What a finished poll reports new is what it hands on: the survivor's polls hand on
    # exactly what the dead poll had not stored, none of it twice. (What the dead poll
    # stored is handed on by the processing sweep, SWEEP_GRACE later.)
    wait_for(
        lambda: not any(run.finished_at is None for run in _later_runs(mailboxes, account)),
        "the survivor's polls to finish",
    )
    handed_on = sum(run.messages_count for run in mailboxes.runs(account) if run.finished_at)
    assert handed_on == total - held_at_kill


def _later_runs(mailboxes: Mailboxes, account: Account) -> list[PollRun]:
    """The polls after the first (the one the dead worker left running)."""
    return mailboxes.runs(account)[1:]


def test_a_bad_password_backs_off_and_ends_disabled_while_others_flow(
    celery: Celery, mailboxes: Mailboxes, set_env: Callable[..., None]
) -> None:
    # Dovecot answers a wrong password after seconds; backoffs of 4, 8 and 16 s (counted
    # from each failed poll's start) outlast that; the fourth failure disables.
    set_env(MAX_CONSECUTIVE_FAILURES=4, BACKOFF_MAX_SECONDS=16)
    bad = mailboxes.add(interval=4, wrong_password=True)
    good = mailboxes.add()
    mailboxes.deliver(good, 2)
    celery.beat()
    celery.worker(concurrency=2)

    def disabled() -> bool:
        mailboxes.db.rollback()
        mailboxes.db.refresh(bad)
        return bad.status == "disabled"

    wait_for(disabled, "the bad mailbox to be disabled")
    assert bad.enabled is False
    assert bad.disabled_reason
    assert len(mailboxes.runs(bad, "auth_error")) == 4
    # Between failures, polls were skipped while the backoff lasted.
    runs = [(r.started_at, r.finished_at, r.outcome, r.error) for r in mailboxes.runs(bad)]
    assert any((error or "").startswith("backing off") for *_, error in runs), "\n".join(
        map(str, runs)
    )
    wait_for(
        lambda: bad.id not in {entry.account_id for entry in service.list_entries()},
        "the bad mailbox's entry to go",
    )

    # The other mailbox kept flowing, and still does.
    wait_for(lambda: mailboxes.ingested(good) == 2, "the good mailbox's mail")
    mailboxes.deliver(good, 2)
    wait_for(lambda: mailboxes.ingested(good) == 4, "the good mailbox's later mail")
    assert len(mailboxes.runs(bad, "auth_error")) == 4


def queued_poll_count(redis_db: RedisDb) -> int:
    return sum(int(redis_db.client().llen(key)) for key in queue_keys("email"))


def test_urgent_mailboxes_and_a_poll_now_overtake_a_long_queue(
    celery: Celery, mailboxes: Mailboxes, redis_db: RedisDb
) -> None:
    # Twenty ordinary mailboxes queue up ahead of an urgent one (created last) while no
    # worker runs; a poll asked for by hand comes after all of them.
    ordinary = [mailboxes.add(interval=3600) for _ in range(20)]
    for account in ordinary:
        account.priority = 1
    mailboxes.db.commit()
    for account in ordinary:
        service.sync_account(account)
    urgent = mailboxes.add(interval=3600)
    urgent.priority = 9
    mailboxes.db.commit()
    service.sync_account(urgent)
    by_hand = mailboxes.add(interval=3600, last_polled_at=utcnow())  # not due for an hour

    beat = celery.beat()
    wait_for(lambda: queued_poll_count(redis_db) == 21, "beat to queue the 21 due polls")
    beat.stop()
    service.enqueue_poll(by_hand.id)

    celery.worker(concurrency=1)  # one poll at a time: the order is the queue's
    everyone = [*ordinary, urgent, by_hand]
    wait_for(lambda: all(mailboxes.runs(account) for account in everyone), "every poll")
    mailboxes.db.rollback()
    order = list(
        mailboxes.db.scalars(
            select(PollRun.account_id)
            .where(PollRun.account_id.in_([a.id for a in everyone]))
            .order_by(PollRun.id)
        )
    )
    # Both went to the top level; among them, first queued, first polled.
    assert order[:2] == [urgent.id, by_hand.id], order


def test_a_worker_logs_one_info_line_per_poll_without_being_asked(
    celery: Celery, mailboxes: Mailboxes
) -> None:
    account = mailboxes.add(interval=3600, last_polled_at=utcnow())
    mailboxes.deliver(account, 2)
    # As compose and `make run` start it: no -l, so celery's own default (WARNING).
    worker = celery.worker(loglevel=None)
    service.enqueue_poll(account.id)
    line = f"poll of mailbox {account.id}: success, 2 new messages in"
    wait_for(lambda: line in worker.log(), "the poll's INFO line")
    assert worker.log().count(f"poll of mailbox {account.id}:") == 1


def test_more_polls_than_the_workers_can_do_starve_no_mailbox(
    celery: Celery, mailboxes: Mailboxes, redis_db: RedisDb
) -> None:
    """60 mailboxes every second ask for 60 polls/s; one worker process does a few dozen
    at most. Every mailbox is still polled, in turn, and none holds two places in the
    queue.

    What the product promises (docs/operations.md) is that intervals stretch alike: no
    mailbox waits longer than twice a fair round robin, not equal counts at an arbitrary
    moment (a mailbox polled just before the moment is one ahead of one polled just
    after). Between two polls of a mailbox, the polls of the others are those queued ahead
    of it (at most one each: the coalescing key) plus those done while it waited for its
    next due time to be queued again (at most one interval; at most one each while the
    worker is behind), so fewer than 2 x 60. When the worker keeps up there is no queue
    to wait in, and the gap is at most its interval and the wait for its next due time:
    2 intervals, and a third for beat's tick on a loaded machine. Counted from the poll
    runs the product records, so the bound holds however fast or slow the machine is."""
    accounts = [mailboxes.add(interval=1) for _ in range(60)]
    ids = [account.id for account in accounts]
    celery.beat()
    worker = celery.worker(concurrency=1)
    longest_queue = 0

    def starts() -> list[tuple[datetime, int]]:
        nonlocal longest_queue
        longest_queue = max(longest_queue, queued_poll_count(redis_db))
        mailboxes.db.rollback()
        rows = mailboxes.db.execute(
            select(PollRun.started_at, PollRun.account_id)
            .where(PollRun.account_id.in_(ids), PollRun.finished_at.is_not(None))
            .order_by(PollRun.started_at)
        )
        return [(started, account_id) for started, account_id in rows]

    def counts(polls: list[tuple[datetime, int]]) -> dict[int, int]:
        found: dict[int, int] = defaultdict(int)
        for _, account_id in polls:
            found[account_id] += 1
        return found

    wait_for(
        lambda: len(found := counts(starts())) == len(ids) and min(found.values()) >= 3,
        "every mailbox polled three times",
        timeout=300,
        details=lambda: repr(dict(counts(starts()))),
    )
    polls = starts()
    unfair = []
    for account_id in ids:
        mine = [index for index, (_, polled) in enumerate(polls) if polled == account_id]
        for before, after in pairwise(mine):
            gap = polls[after][0] - polls[before][0]
            others = after - before - 1
            if others >= 2 * len(ids) and gap > timedelta(seconds=3):
                unfair.append((account_id, others, gap.total_seconds()))
    assert not unfair, (unfair, dict(counts(polls)))
    assert longest_queue <= len(ids)
    assert "Discarding revoked task" not in worker.log()


def test_poll_now_during_a_backoff_says_until_when_and_force_polls_through(
    celery: Celery, mailboxes: Mailboxes, api: TestClient
) -> None:
    account = mailboxes.add(interval=3600, last_polled_at=utcnow())
    mailboxes.deliver(account, 2)
    account.status = AccountStatus.ERROR
    account.consecutive_failures = 2
    account.backoff_until = utcnow() + timedelta(hours=1)
    account.last_error = "connection refused"
    mailboxes.db.commit()

    refused = api.post(f"/accounts/{account.id}/poll")
    assert refused.status_code == 409, refused.text
    detail = refused.json()["detail"]
    assert f"backing off until {account.backoff_until.isoformat()}" in detail
    assert "connection refused" in detail
    assert "?force=true" in detail

    celery.worker()
    queued = api.post(f"/accounts/{account.id}/poll", params={"force": "true"})
    assert queued.status_code == 202, queued.text
    task_id = queued.json()["task_id"]

    def forced_run() -> PollRun | None:
        runs = [r for r in mailboxes.runs(account) if r.task_id == task_id and r.finished_at]
        return runs[0] if runs else None

    wait_for(forced_run, "the forced poll")
    run = forced_run()
    assert run is not None and run.outcome == PollOutcome.SUCCESS, run
    assert mailboxes.ingested(account) == 2
    mailboxes.db.rollback()
    assert mailboxes.db.get(Account, account.id).backoff_until is None  # type: ignore[union-attr]


def test_a_new_mailbox_is_polled_at_once_then_keeps_its_phase(
    celery: Celery, mailboxes: Mailboxes
) -> None:
    celery.worker()
    beat = celery.beat()
    wait_for(lambda: "beat: Acquired lock" in beat.log(), "beat to run")
    # Hourly, never polled: without the first poll at once it would wait up to an hour.
    account = mailboxes.add(interval=3600)
    mailboxes.deliver(account, 2)
    wait_for(lambda: mailboxes.ingested(account) == 2, "the first poll", timeout=30)
    [entry] = [e for e in service.list_entries() if e.account_id == account.id]
    [run] = mailboxes.runs(account)
    # The next poll is an hour after that first one.
    assert entry.next_run_at is not None and entry.last_run_at is not None
    assert abs((entry.last_run_at - run.started_at).total_seconds()) < 5
    assert entry.next_run_at == entry.last_run_at + timedelta(seconds=3600)
