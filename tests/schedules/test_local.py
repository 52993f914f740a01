"""The local scheduler's own rules, with a recording poll function (the real poll runs in
tests/e2e/test_scheduling_local.py)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from itertools import pairwise

import pytest
from sqlalchemy.orm import Session

from backend import dispatch
from backend.errors import ServiceUnavailable
from backend.mailbox.polling import run_poll
from backend.main import local_housekeeping
from backend.models import Message, utcnow
from backend.schedules import service
from backend.schedules.local import LocalScheduler
from backend.schedules.store import Wanted
from tests.support.accounts import make_account
from tests.support.wait import wait_for


class Recorder:
    """A poll that takes `duration` seconds and notes overlaps per mailbox."""

    def __init__(self, duration: float = 0.0) -> None:
        self.duration = duration
        self.calls: dict[int, list[str]] = defaultdict(list)
        self.started: dict[int, list[float]] = defaultdict(list)  # time.monotonic()
        self.active: dict[int, int] = defaultdict(int)
        self.overlaps = 0
        self.forced: list[str] = []  # task ids of the forced polls
        self._lock = threading.Lock()

    def __call__(self, account_id: int, task_id: str, force: bool) -> None:
        with self._lock:
            if force:
                self.forced.append(task_id)
            self.active[account_id] += 1
            if self.active[account_id] > 1:
                self.overlaps += 1
            self.calls[account_id].append(task_id)
            self.started[account_id].append(time.monotonic())
        time.sleep(self.duration)
        with self._lock:
            self.active[account_id] -= 1

    def count(self, account_id: int) -> int:
        with self._lock:
            return len(self.calls[account_id])


def _wanted(*pairs: tuple[int, int]) -> dict[int, Wanted]:
    return {account_id: Wanted(account_id, interval, None) for account_id, interval in pairs}


@pytest.fixture
def run_scheduler() -> Iterator[Callable[..., LocalScheduler]]:
    started: list[LocalScheduler] = []

    def _run(
        poll: Recorder, load: Callable[[], Mapping[int, Wanted]], refresh: float = 60.0
    ) -> LocalScheduler:
        scheduler = LocalScheduler(poll=poll, load=load, refresh_seconds=refresh)
        scheduler.start()
        started.append(scheduler)
        return scheduler

    yield _run
    for scheduler in started:
        scheduler.stop()


def test_polls_every_account_on_its_interval(run_scheduler: Callable[..., LocalScheduler]) -> None:
    recorder = Recorder()
    run_scheduler(recorder, lambda: _wanted((1, 1), (2, 2)))
    wait_for(lambda: recorder.count(2) >= 3, "three polls of the slower mailbox")
    assert recorder.overlaps == 0
    for account_id, interval in ((1, 1), (2, 2)):
        starts = recorder.started[account_id][:4]
        gaps = [later - earlier for earlier, later in pairwise(starts)]
        # Never early (the clock's resolution aside); a late start only on a busy machine.
        assert all(interval - 0.05 <= gap < interval * 3 for gap in gaps), (account_id, gaps)
    # The slower mailbox is not polled as often as the faster one.
    assert recorder.count(1) >= 2 * recorder.count(2) - 2, dict(recorder.calls)


def test_one_poll_at_a_time_per_mailbox(run_scheduler: Callable[..., LocalScheduler]) -> None:
    recorder = Recorder(duration=0.5)
    scheduler = run_scheduler(recorder, lambda: _wanted((1, 1)))
    for _ in range(5):
        scheduler.run_now(1)
    wait_for(lambda: recorder.count(1) >= 4, "four polls")
    assert recorder.overlaps == 0


def test_run_now_and_changes(run_scheduler: Callable[..., LocalScheduler]) -> None:
    recorder = Recorder()
    scheduler = run_scheduler(recorder, dict)
    assert scheduler.entries() == []

    task_id = scheduler.run_now(5)  # an account without an entry is still polled on request
    wait_for(lambda: recorder.count(5) == 1, "the requested poll")
    assert recorder.calls[5] == [task_id]
    forced = scheduler.run_now(7, force=True)  # through a backoff
    wait_for(lambda: recorder.count(7) == 1, "the forced poll")
    assert recorder.forced == [forced]

    assert scheduler.put(6, 3600, None)
    assert not scheduler.put(6, 3600, None)
    [entry] = scheduler.entries()
    assert (entry.account_id, entry.name, entry.interval) == (6, "mailbox:6", 3600)
    next_run = entry.next_run_at
    assert next_run is not None

    # An interval change keeps the phase: the next run moves by the difference only.
    assert scheduler.put(6, 7200, None)
    [changed] = scheduler.entries()
    assert changed.next_run_at == next_run + timedelta(seconds=3600)

    assert scheduler.remove(6)
    assert scheduler.entries() == []


def test_replace_all_counts(run_scheduler: Callable[..., LocalScheduler]) -> None:
    scheduler = run_scheduler(Recorder(), dict)
    scheduler.replace_all(_wanted((1, 600), (2, 600), (3, 600)))
    counts = scheduler.replace_all(_wanted((1, 600), (2, 900), (4, 600)))
    assert (counts.created, counts.updated, counts.deleted, counts.unchanged) == (1, 1, 1, 1)
    assert [entry.account_id for entry in scheduler.entries()] == [1, 2, 4]


def test_a_poll_that_raises_does_not_stop_the_scheduler(
    run_scheduler: Callable[..., LocalScheduler],
) -> None:
    recorder = Recorder()

    def failing(account_id: int, task_id: str, force: bool) -> None:
        recorder(account_id, task_id, force)
        raise RuntimeError("boom")

    run_scheduler(failing, lambda: _wanted((1, 1)))
    wait_for(lambda: recorder.count(1) >= 2, "a poll after the failure")


def test_rereads_the_database(
    db: Session, set_env: Callable[..., None], run_scheduler: Callable[..., LocalScheduler]
) -> None:
    set_env(SCHEDULER_MODE="local")
    recorder = Recorder()
    scheduler = run_scheduler(recorder, service._load_wanted, refresh=0.2)
    account = make_account(db, poll_interval_seconds=3600, last_polled_at=utcnow())
    wait_for(lambda: [e.account_id for e in scheduler.entries()] == [account.id], "the account")
    account.enabled = False
    db.commit()
    wait_for(lambda: scheduler.entries() == [], "the account to go")
    assert recorder.count(account.id) == 0


def test_service_in_local_mode(db: Session, set_env: Callable[..., None]) -> None:
    set_env(SCHEDULER_MODE="local", RECONCILE_INTERVAL_SECONDS=3600)
    assert service.list_entries() == []
    with pytest.raises(ServiceUnavailable):
        service.enqueue_poll(1)
    assert service.start_local_scheduler_if_needed(poll=run_poll, housekeeping=local_housekeeping)
    try:
        assert service.start_local_scheduler_if_needed(
            poll=run_poll, housekeeping=local_housekeeping
        )  # once per process
        account = make_account(db, poll_interval_seconds=3600, last_polled_at=utcnow())
        service.sync_account(account)
        assert [entry.account_id for entry in service.list_entries()] == [account.id]
        account.poll_interval_seconds = 7200
        db.commit()
        assert service.reconcile(db).as_dict() == {
            "created": 0,
            "updated": 1,
            "deleted": 0,
            "unchanged": 0,
        }
        service.remove_account(account.id)
        assert service.list_entries() == []
    finally:
        service.stop_local_scheduler()


def test_celery_mode_starts_no_local_scheduler() -> None:
    assert dispatch.mode() == "celery"
    assert (
        service.start_local_scheduler_if_needed(poll=run_poll, housekeeping=local_housekeeping)
        is False
    )


def test_housekeeping_runs_at_start_and_on_every_refresh() -> None:
    runs: list[float] = []

    def housekeeping() -> None:
        runs.append(time.monotonic())
        if len(runs) == 2:
            raise RuntimeError("one failure must not stop the next run")

    # Refreshes an hour apart: the only run there can be is the one at start.
    at_start = LocalScheduler(
        poll=Recorder(), load=dict, refresh_seconds=3600, housekeeping=housekeeping
    )
    at_start.start()
    try:
        wait_for(lambda: len(runs) == 1, "the housekeeping run at start")
    finally:
        at_start.stop()

    runs.clear()
    every = LocalScheduler(
        poll=Recorder(), load=dict, refresh_seconds=0.2, housekeeping=housekeeping
    )
    started = time.monotonic()
    every.start()
    try:
        wait_for(lambda: len(runs) >= 4, "four housekeeping runs, one after the failing one")
    finally:
        every.stop()
    assert runs[0] - started < 0.2  # at start, not after the first refresh interval
    gaps = [later - earlier for earlier, later in pairwise(runs)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # once per refresh, not in a loop


def test_local_mode_housekeeping_processes_lost_messages(
    db: Session, set_env: Callable[..., None]
) -> None:
    """A message whose processing never happened (the process died after the poll
    committed) is picked up by the local scheduler's housekeeping."""
    set_env(SCHEDULER_MODE="local", RECONCILE_INTERVAL_SECONDS=3600)
    account = make_account(db, poll_interval_seconds=3600, last_polled_at=utcnow())
    message = Message(account_id=account.id, folder="INBOX", uidvalidity=1, uid=1)
    message.ingested_at = utcnow() - timedelta(hours=1)
    db.add(message)
    db.commit()
    assert service.start_local_scheduler_if_needed(poll=run_poll, housekeeping=local_housekeeping)
    try:

        def processed() -> bool:
            db.expire_all()
            return db.get(Message, message.id).processed_at is not None  # type: ignore[union-attr]

        wait_for(processed, "the sweep to process the lost message")
    finally:
        service.stop_local_scheduler()


def test_housekeeping_never_runs_twice_at_once() -> None:
    release = threading.Event()
    active: list[int] = []
    overlaps: list[int] = []

    def slow_housekeeping() -> None:
        active.append(1)
        if len(active) > 1:
            overlaps.append(len(active))
        release.wait(timeout=30)
        active.pop()

    scheduler = LocalScheduler(
        poll=Recorder(), load=dict, refresh_seconds=0.05, housekeeping=slow_housekeeping
    )
    scheduler.start()
    try:
        wait_for(lambda: len(active) == 1, "the first housekeeping run")
        time.sleep(0.5)  # ten refreshes while it is still running
        assert len(active) == 1
        release.set()
    finally:
        scheduler.stop()
    assert overlaps == []
