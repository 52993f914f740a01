"""Schedules: one poll entry per pollable mailbox, kept in step with the database.

With Redis (mode "celery") the entries are RedBeat's, named `mailbox:{id}`, and Celery
beat dispatches `mailbox.poll` to the `email` queue; without it (mode "local") an
in-process scheduler runs the same polls. The database is the truth: `sync_account` is
called right after a commit that changes an account, and `reconcile` rebuilds everything
from the database (at beat start, periodically, from the admin API, and when Redis is
found empty).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from backend import dispatch, paging, redis
from backend.accounts import state
from backend.celery_app import TOP_PRIORITY, queue_keys
from backend.config import get_settings
from backend.db import session_scope
from backend.errors import ServiceUnavailable
from backend.models import Account, AccountStatus, PollRun, SchedulerMode, utcnow
from backend.schedules import store
from backend.schedules.local import HousekeepingFunction, LocalScheduler, PollFunction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduleEntry:
    account_id: int
    name: str
    interval: int
    last_run_at: datetime | None
    next_run_at: datetime | None


@dataclass(frozen=True)
class ReconcileResult:
    created: int
    updated: int
    deleted: int
    unchanged: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def wants_schedule(account: Account) -> bool:
    """Whether an account should have a schedule entry. One failing with status "error"
    keeps it: its poll skips while the account's backoff lasts."""
    return state.wants_polls(account)


def wanted_clause() -> ColumnElement[bool]:
    return Account.enabled.is_(True) & (Account.status != AccountStatus.DISABLED)


# -- one account ---------------------------------------------------------------------


def sync_account(account: Account) -> None:
    """Bring the account's entry in line with the committed account: create it, update it
    in place (an interval change keeps the phase) or remove it. Redis trouble is logged,
    not raised: the commit stands and the next reconcile repairs the entry."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        if scheduler is not None:
            if wants_schedule(account):
                scheduler.put(
                    account.id,
                    account.poll_interval_seconds,
                    account.last_polled_at,
                    first_poll_now=True,
                )
            else:
                scheduler.remove(account.id)
        return
    wanted = {}
    if wants_schedule(account):
        wanted[account.id] = store.Wanted(
            account.id, account.poll_interval_seconds, account.last_polled_at, account.priority
        )
    try:
        store.apply(wanted, [store.entry_key(account.id)], utcnow(), first_poll_now=True)
    except redis.RedisError as exc:
        log.warning(
            "schedule entry for mailbox %s not updated (%s); the next reconcile will fix it",
            account.id,
            exc,
        )


def remove_account(account_id: int) -> None:
    """Remove the account's entry (deleted or disabled account). Never raises for Redis."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        if scheduler is not None:
            scheduler.remove(account_id)
        return
    try:
        store.delete(account_id)
    except redis.RedisError as exc:
        log.warning(
            "schedule entry for mailbox %s not removed (%s); the next reconcile will remove it",
            account_id,
            exc,
        )


def enqueue_poll(account_id: int, *, force: bool = False) -> str:
    """Poll a mailbox now (`force`: through a backoff); returns the task id."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        if scheduler is None:
            raise ServiceUnavailable(
                "the local scheduler is not running in this process; polls run in the API "
                "process when Redis is unavailable"
            )
        return scheduler.run_now(account_id, force=force)
    # Asked for by hand: ahead of every scheduled poll in the queue. By name: the API
    # need not import the task module (and its ingestion imports).
    task_id = dispatch.enqueue(
        store.POLL_TASK,
        *((account_id, True) if force else (account_id,)),
        priority=TOP_PRIORITY,
        headers={SENT_AT_HEADER: time.time()},
    )
    assert task_id is not None  # not coalesced
    return task_id


def enqueue_poll_later(account_id: int, seconds: float) -> bool:
    """The mailbox's poll again in `seconds` (its poll found no connection slot free,
    backend/mailbox/budget.py), coalesced with any poll already waiting."""
    task_id = dispatch.enqueue(
        store.POLL_TASK,
        account_id,
        countdown=seconds,
        coalesce_key=store.pending_key(account_id),
        coalesce_expiry=store.pending_seconds(),
        headers={SENT_AT_HEADER: time.time() + seconds},
    )
    return task_id is not None


def enqueue_news_poll(account_id: int, news_at: float | None = None) -> bool:
    """A poll because there may be news of the mailbox: the server reported it
    (backend/push/, `news_at` in epoch seconds travels with it to time the push), or a
    poll found the mailbox busy (backend/mailbox/lock.py). At the top priority, and
    coalesced with beat's polls under the same key, so a mailbox never has two polls
    waiting. Returns whether it was sent (False: one already waits, and will see it)."""
    headers: dict[str, float] = {SENT_AT_HEADER: time.time()}
    if news_at is not None:
        headers[NEWS_AT_HEADER] = news_at
    task_id = dispatch.enqueue(
        store.POLL_TASK,
        account_id,
        priority=TOP_PRIORITY,
        coalesce_key=store.pending_key(account_id),
        coalesce_expiry=store.pending_seconds(),
        headers=headers,
    )
    return task_id is not None


# -- all accounts --------------------------------------------------------------------


# Accounts per page of a reconcile: the database streams them (a server-side cursor on
# PostgreSQL), and each page is compared and fixed in Redis before the next is read.
RECONCILE_PAGE = 5_000


def wanted_accounts(session: Session) -> dict[int, store.Wanted]:
    return {want.account_id: want for page in wanted_pages(session) for want in page.values()}


def wanted_pages(session: Session) -> Iterator[dict[int, store.Wanted]]:
    """The accounts that want an entry, RECONCILE_PAGE at a time, never all in memory."""
    query = select(
        Account.id, Account.poll_interval_seconds, Account.last_polled_at, Account.priority
    ).where(wanted_clause())
    result = session.execute(query.execution_options(yield_per=RECONCILE_PAGE))
    for rows in result.partitions():
        # The columns in Wanted's order.
        yield {row[0]: store.Wanted(*row) for row in rows}


def has_wanted_accounts(session: Session) -> bool:
    return session.scalar(select(Account.id).where(wanted_clause()).limit(1)) is not None


def reconcile(session: Session) -> ReconcileResult:
    """Rebuild the schedule from the database: create the missing entries, fix the
    changed, delete the orphans. Reads only; the caller's boundary closes the session."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        wanted = wanted_accounts(session)
        counts = scheduler.replace_all(wanted) if scheduler is not None else store.Counts()
    else:
        # The sorted set first, the database after: an entry that an account created
        # meanwhile adds is then missing from `members`, never deleted as an orphan.
        members = store.mailbox_members(store.client())
        counts = store.apply_pages(wanted_pages(session), members, utcnow())
    result = ReconcileResult(counts.created, counts.updated, counts.deleted, counts.unchanged)
    if result.created or result.updated or result.deleted:
        log.info("schedule reconciled: %s", result.as_dict())
    return result


def list_entries() -> list[ScheduleEntry]:
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        stored = scheduler.entries() if scheduler is not None else []
    else:
        stored = store.read_entries()
    # vars(), not asdict(): asdict deep-copies every datetime, 1 s for 10,000 entries.
    return [ScheduleEntry(**vars(entry)) for entry in stored]


def count_entries() -> int:
    """How many mailbox entries the schedule holds; in Redis one ZCARD, no entry read."""
    if dispatch.mode() == SchedulerMode.LOCAL:
        scheduler = _local_scheduler()
        return len(scheduler.entries()) if scheduler is not None else 0
    return store.count_entries()


def page_entries(
    session: Session, *, limit: int, offset: int = 0, after: int | None = None
) -> paging.Page[ScheduleEntry]:
    """A page of the schedule by account id. In Redis the page walks the scheduled
    accounts in the database (on their index) and reads just their entries, in one
    round trip: an account whose entry is missing (until the next reconcile) is left
    out, and `offset` counts scheduled accounts. `total` is the entries Redis holds."""
    if dispatch.mode() == SchedulerMode.LOCAL:  # in memory, by account id
        scheduler = _local_scheduler()
        stored = scheduler.entries() if scheduler is not None else []
        items = [e for e in stored if e.account_id > (after or 0)][offset : offset + limit + 1]
        more = len(items) > limit
        return paging.Page(
            [ScheduleEntry(**vars(entry)) for entry in items[:limit]],
            total=count_entries(),
            next_after=items[limit - 1].account_id if more else None,
        )
    ids = paging.page(
        session,
        select(Account.id).where(wanted_clause()),
        Account.id,
        limit=limit,
        offset=offset,
        after=after,
        total=count_entries(),
    )
    entries = [ScheduleEntry(**vars(entry)) for entry in store.read_entries_of(ids.items)]
    return paging.Page(entries, total=ids.total, next_after=ids.next_after)


# -- the local scheduler -------------------------------------------------------------

_local: LocalScheduler | None = None
_local_guard = threading.Lock()


def _local_scheduler() -> LocalScheduler | None:
    return _local


def start_local_scheduler_if_needed(
    *, poll: PollFunction, housekeeping: HousekeepingFunction
) -> bool:
    """In local mode, start the in-process scheduler (once per process); True if it runs.
    The composition root (backend/main.py) passes what it runs: a poll of one mailbox, and
    beat's periodic work."""
    global _local  # noqa: PLW0603 - one scheduler per process
    if dispatch.mode() != SchedulerMode.LOCAL:
        return False
    with _local_guard:
        if _local is None:
            scheduler = LocalScheduler(
                poll=poll,
                load=_load_wanted,
                refresh_seconds=get_settings().reconcile_interval_seconds,
                housekeeping=housekeeping,
            )
            scheduler.start()
            _local = scheduler
    return True


def stop_local_scheduler(timeout: float = 30.0) -> None:
    global _local
    with _local_guard:
        scheduler, _local = _local, None
    if scheduler is not None:
        scheduler.stop(timeout)


def _load_wanted() -> dict[int, store.Wanted]:
    with session_scope() as session:
        return wanted_accounts(session)


def reset_cache() -> None:
    """Stop a local scheduler (tests change the environment)."""
    stop_local_scheduler()


# -- capacity ------------------------------------------------------------------------

# Completed polls are counted over this window.
CAPACITY_WINDOW_SECONDS = 60
# The header every queued poll carries with the moment it was sent (epoch seconds).
SENT_AT_HEADER = "mailbeat_sent_at"
# When the server reported the news a push poll was sent for (epoch seconds).
NEWS_AT_HEADER = "mailbeat_news_at"


@dataclass
class Capacity:
    mode: SchedulerMode
    mailboxes: int
    demanded_polls_per_second: float
    completed_polls_per_second: float
    # Held checks that found nothing new (backend/push/held.py): idle polls without a
    # task, counted with the polls in the stretch.
    completed_checks_per_second: float
    queue_length: int | None
    oldest_pending_seconds: float | None
    # demanded / completed: 1.0 keeps up, 2.0 every interval takes twice as long.
    interval_stretch: float | None
    behind: bool


def capacity(session: Session) -> Capacity:
    """What the schedule asks for against what the workers do: polls per second demanded
    (the sum of 1/interval over scheduled mailboxes) and completed (over the last
    CAPACITY_WINDOW_SECONDS; polls and held checks), the poll queue, and how long its
    oldest poll has waited. Two aggregate queries and two Redis round trips, whatever
    the size."""
    mailboxes, demanded = session.execute(
        select(
            func.count(Account.id),
            func.coalesce(func.sum(1.0 / Account.poll_interval_seconds), 0.0),
        ).where(wanted_clause())
    ).one()
    since = utcnow() - timedelta(seconds=CAPACITY_WINDOW_SECONDS)
    completed = session.scalar(select(func.count(PollRun.id)).where(PollRun.finished_at >= since))
    completed_rate = (completed or 0) / CAPACITY_WINDOW_SECONDS
    queue_length: int | None = None
    oldest: float | None = None
    checks_rate = 0.0
    if dispatch.mode() == SchedulerMode.CELERY:
        queue_length, oldest = poll_queue()
        checks_rate = store.checks_per_second(CAPACITY_WINDOW_SECONDS, time.time())
    done = completed_rate + checks_rate
    stretch = None if not done else max(float(demanded) / done, 1.0)
    lag_limit = get_settings().poll_lag_degraded_seconds
    return Capacity(
        mode=dispatch.mode(),
        mailboxes=int(mailboxes),
        demanded_polls_per_second=round(float(demanded), 3),
        completed_polls_per_second=round(completed_rate, 3),
        completed_checks_per_second=round(checks_rate, 3),
        queue_length=queue_length,
        oldest_pending_seconds=None if oldest is None else round(oldest, 1),
        interval_stretch=None if stretch is None else round(stretch, 2),
        behind=oldest is not None and oldest > lag_limit,
    )


def poll_queue() -> tuple[int, float | None]:
    """The polls waiting in the email queue and the age of the oldest. Each priority
    level is a list consumed from its tail, so the oldest poll of a level is its last
    element: one LLEN and one LINDEX per level."""
    keys = queue_keys(store.POLL_QUEUE)
    with redis.probe() as conn, conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
            pipe.lindex(key, -1)
        replies = pipe.execute()
    length = sum(int(n) for n in replies[0::2])
    sent = [t for t in (_sent_at(raw) for raw in replies[1::2] if raw) if t is not None]
    oldest = max(time.time() - min(sent), 0.0) if sent else None
    return length, oldest


def _sent_at(raw: bytes) -> float | None:
    try:
        value = json.loads(raw)["headers"].get(SENT_AT_HEADER)
        return None if value is None else float(value)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
