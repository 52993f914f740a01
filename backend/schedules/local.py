"""The local scheduler: polls on each account's interval from threads in this process,
for a machine without Redis (a laptop, a demo). One poll at a time per mailbox, as with
the Redis lock in Celery mode; a few mailboxes at once on a small thread pool.

It learns about changes two ways: `put`/`remove` from `sync_account` in this process, and
a periodic re-read of the database (`load`) that catches changes made elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from backend.models import utcnow
from backend.schedules.phase import initial_last_run
from backend.schedules.store import Counts, StoredEntry, Wanted, entry_name

log = logging.getLogger(__name__)

# Upper bound on one sleep of the loop: changes wake it at once anyway.
MAX_SLEEP_SECONDS = 1.0

PollFunction = Callable[[int, str, bool], object]  # account id, task id, force
LoadFunction = Callable[[], Mapping[int, Wanted]]
HousekeepingFunction = Callable[[], None]


@dataclass
class _Job:
    interval: int
    # The moment the next run is counted from: the last start, or a spread-out start.
    anchor: datetime
    started_at: datetime | None = None

    @property
    def due_at(self) -> datetime:
        return self.anchor + timedelta(seconds=self.interval)


class LocalScheduler:
    def __init__(
        self,
        *,
        poll: PollFunction,
        load: LoadFunction,
        refresh_seconds: float,
        workers: int = 4,
        housekeeping: HousekeepingFunction | None = None,
    ) -> None:
        self._poll = poll
        self._load = load
        self._housekeeping = housekeeping
        self._housekeeping_running = False
        self._refresh_seconds = refresh_seconds
        self._jobs: dict[int, _Job] = {}
        self._running: set[int] = set()
        self._requested: dict[int, tuple[str, bool]] = {}  # account -> task id, force
        self._cond = threading.Condition()
        self._stopping = False
        self._refresh_at = 0.0  # monotonic; 0 = at once
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poll")
        self._thread = threading.Thread(target=self._loop, name="local-scheduler", daemon=True)

    # -- control -------------------------------------------------------------------

    def start(self) -> None:
        # The first read before returning: once started, the jobs are the database's.
        self._refresh()
        self._thread.start()
        log.info("local scheduler: started with %d mailboxes", len(self._jobs))

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        # Polls already running finish (they commit per batch); queued ones are dropped.
        self._executor.shutdown(wait=True, cancel_futures=True)
        log.info("local scheduler: stopped")

    # -- changes -------------------------------------------------------------------

    def put(
        self,
        account_id: int,
        interval: int,
        last_polled_at: datetime | None,
        *,
        first_poll_now: bool = False,
    ) -> bool:
        """Add an account or change its interval (keeping its phase). True if it changed.
        `first_poll_now`: see `initial_last_run`."""
        with self._cond:
            job = self._jobs.get(account_id)
            if job is not None:
                if job.interval == interval:
                    return False
                job.interval = interval
            else:
                anchor = initial_last_run(
                    account_id, interval, last_polled_at, utcnow(), first_poll_now=first_poll_now
                )
                self._jobs[account_id] = _Job(interval=interval, anchor=anchor)
            self._cond.notify_all()
            return True

    def remove(self, account_id: int) -> bool:
        with self._cond:
            self._requested.pop(account_id, None)
            removed = self._jobs.pop(account_id, None) is not None
            self._cond.notify_all()
            return removed

    def replace_all(self, wanted: Mapping[int, Wanted]) -> Counts:
        """Make the jobs exactly `wanted` (the database's view)."""
        counts = Counts()
        with self._cond:
            for account_id in set(self._jobs) - set(wanted):
                self.remove(account_id)
                counts.deleted += 1
            for account_id, want in wanted.items():
                existed = account_id in self._jobs
                if not self.put(account_id, want.interval_seconds, want.last_polled_at):
                    counts.unchanged += 1
                elif existed:
                    counts.updated += 1
                else:
                    counts.created += 1
        return counts

    def run_now(self, account_id: int, *, force: bool = False) -> str:
        """Poll as soon as the mailbox is free (`force`: through a backoff); returns an id
        for the request. A request while one waits joins it (and may make it forced)."""
        with self._cond:
            task_id, forced = self._requested.get(account_id, (str(uuid.uuid4()), False))
            self._requested[account_id] = (task_id, forced or force)
            self._cond.notify_all()
            return task_id

    def entries(self) -> list[StoredEntry]:
        with self._cond:
            return [
                StoredEntry(
                    account_id=account_id,
                    name=entry_name(account_id),
                    interval=job.interval,
                    last_run_at=job.started_at,
                    next_run_at=job.due_at,
                )
                for account_id, job in sorted(self._jobs.items())
            ]

    def is_running(self, account_id: int) -> bool:
        with self._cond:
            return account_id in self._running

    # -- the loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                refresh = time.monotonic() >= self._refresh_at
            if refresh:
                self._refresh()
            with self._cond:
                if self._stopping:
                    return
                self._cond.wait(self._dispatch_due())

    def _refresh(self) -> None:
        try:
            self.replace_all(self._load())
        except Exception:
            log.exception("local scheduler: could not read the accounts; trying again later")
        with self._cond:
            # One run at a time: a slow S3 upload must not pile runs onto the poll threads.
            start = self._housekeeping is not None and not self._housekeeping_running
            self._housekeeping_running = self._housekeeping_running or start
        if start:
            # What beat's periodic tasks do in Celery mode; on the pool, so it never
            # delays a due poll.
            self._executor.submit(self._run_housekeeping)
        with self._cond:
            self._refresh_at = time.monotonic() + self._refresh_seconds

    def _dispatch_due(self) -> float:
        """Start every due poll whose mailbox is free; returns how long to sleep."""
        now = utcnow()
        sleep = min(MAX_SLEEP_SECONDS, max(self._refresh_at - time.monotonic(), 0.0))
        for account_id in list(self._requested):
            if account_id not in self._running:
                self._start(account_id, *self._requested.pop(account_id), now)
        for account_id, job in self._jobs.items():
            if account_id in self._running:
                continue
            wait = (job.due_at - now).total_seconds()
            if wait <= 0:
                self._start(account_id, str(uuid.uuid4()), False, now)
            else:
                sleep = min(sleep, wait)
        return sleep

    def _start(self, account_id: int, task_id: str, force: bool, now: datetime) -> None:
        job = self._jobs.get(account_id)
        if job is not None:
            job.anchor = job.started_at = now
        self._running.add(account_id)
        self._executor.submit(self._run, account_id, task_id, force)

    def _run_housekeeping(self) -> None:
        assert self._housekeeping is not None
        try:
            self._housekeeping()
        except Exception:
            log.exception("local scheduler: housekeeping failed; trying again at the next refresh")
        finally:
            with self._cond:
                self._housekeeping_running = False

    def _run(self, account_id: int, task_id: str, force: bool) -> None:
        try:
            self._poll(account_id, task_id, force)
        except Exception:
            log.exception("local scheduler: poll of mailbox %s failed", account_id)
        finally:
            with self._cond:
                self._running.discard(account_id)
                self._cond.notify_all()
