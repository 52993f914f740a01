"""Admin: the schedule, the Celery workers and their tasks, and the service's health.

Celery has no result backend here (outcomes are written to SQL), so a task is found
either in a worker (inspect), waiting in its Redis queue, or through the poll run that
recorded it. Every call that needs Redis first checks that it answers, so a dead Redis
is a quick 503 rather than Celery's connection retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, case, cast, func, select, text
from sqlalchemy.orm import Session

from backend import dispatch, redis
from backend.admin.schemas import (
    ActivityBucket,
    ActivityRead,
    CapacityRead,
    HealthRead,
    PollRunRead,
    ReconcileRead,
    RetryRead,
    ScheduleEntryRead,
    ScheduleList,
    TaskList,
    TaskRead,
    TaskStateRead,
    WorkerList,
    WorkerRead,
)
from backend.audit import freshness
from backend.celery_app import app, broker_connection, queue_keys
from backend.config import get_settings
from backend.db import epoch, get_engine, session_scope
from backend.errors import Conflict, NotFound, ServiceUnavailable
from backend.models import (
    FAILED_POLL_OUTCOMES,
    Account,
    HealthStatus,
    PollOutcome,
    PollRun,
    SchedulerMode,
    utcnow,
)
from backend.schedules import service as schedules
from backend.singleflight import SharedResult
from backend.storage import service as storage

log = logging.getLogger(__name__)

WORKERS = "the Celery workers"
# How far into each queue a task lookup reads (LRANGE), so a huge backlog stays cheap.
QUEUE_SCAN_LIMIT = 50_000


def ensure_redis(what: str) -> None:
    """Answer 503 at once, saying why, when Redis does not answer; `what` names what
    needs it ("the Celery workers", "the schedule")."""
    timeout = get_settings().health_check_timeout_seconds
    try:
        with redis.probe(timeout) as client:
            client.ping()
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"{what} cannot be reached: Redis at {redis.location()} did not answer within "
            f"{timeout:g}s ({type(exc).__name__})"
        ) from exc


# -- the schedule ----------------------------------------------------------------------


def require_scheduler() -> None:
    """In Celery mode the schedule and the queues are in Redis: 503 when it is gone."""
    if dispatch.mode() == SchedulerMode.CELERY:
        ensure_redis("the schedule and the poll queue")


def sync_schedule(session: Session) -> ReconcileRead:
    require_scheduler()
    return ReconcileRead(**schedules.reconcile(session).as_dict())


def list_schedule(
    session: Session, *, limit: int, offset: int = 0, after: int | None = None
) -> ScheduleList:
    require_scheduler()
    page = schedules.page_entries(session, limit=limit, offset=offset, after=after)
    return ScheduleList(
        mode=dispatch.mode(),
        items=[ScheduleEntryRead(**vars(entry)) for entry in page.items],
        total=page.total,
        next_after=page.next_after,
    )


# -- Celery ------------------------------------------------------------------------------


def _inspect(command: str, *args: Any, names: list[str] | None = None) -> dict[str, Any]:
    """Ask the workers (all, or `names`) and wait CELERY_INSPECT_TIMEOUT_SECONDS for their
    replies, on a broker connection taken from the shared pool with a timeout."""
    settings = get_settings()
    with broker_connection(settings.health_check_timeout_seconds) as connection:
        # Asking known workers with a reply limit returns as soon as they all answered.
        inspect = app.control.inspect(
            timeout=settings.celery_inspect_timeout_seconds,
            connection=connection,
            destination=names,
            limit=None if names is None else len(names),
        )
        return dict(getattr(inspect, command)(*args) or {})


def _worker_names() -> list[str]:
    """The workers that answer a ping within the inspect timeout."""
    ensure_redis(WORKERS)
    try:
        replies = _inspect("ping")
    except Exception as exc:
        raise ServiceUnavailable(f"{WORKERS} could not be asked ({type(exc).__name__})") from exc
    return sorted(replies)


def _ask(names: list[str], command: str, *args: Any) -> dict[str, Any]:
    if not names:
        return {}
    try:
        return _inspect(command, *args, names=names)
    except Exception as exc:
        raise ServiceUnavailable(f"{WORKERS} could not be asked ({type(exc).__name__})") from exc


def capacity(session: Session) -> CapacityRead:
    try:
        result = schedules.capacity(session)
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"the poll queue could not be read: Redis at {redis.location()} did not answer "
            f"({type(exc).__name__})"
        ) from exc
    return CapacityRead(**vars(result), stale_mailboxes=freshness.staleness(session).stale)


def list_workers() -> WorkerList:
    names = _worker_names()
    stats = _ask(names, "stats")
    queues = _ask(names, "active_queues")
    active = _ask(names, "active")
    workers = []
    for name in names:
        stat = stats.get(name) or {}
        workers.append(
            WorkerRead(
                name=name,
                queues=sorted(q.get("name", "?") for q in queues.get(name) or []),
                active=len(active.get(name) or []),
                concurrency=(stat.get("pool") or {}).get("max-concurrency"),
                processed=sum((stat.get("total") or {}).values()),
                pid=stat.get("pid"),
            )
        )
    return WorkerList(workers=workers, total=len(workers))


def list_tasks() -> TaskList:
    names = _worker_names()
    return TaskList(
        active=_tasks(_ask(names, "active"), "active"),
        reserved=_tasks(_ask(names, "reserved"), "reserved"),
        scheduled=_tasks(_ask(names, "scheduled"), "scheduled"),
    )


def _tasks(replies: dict[str, Any], state: str) -> list[TaskRead]:
    tasks = []
    for worker, entries in sorted(replies.items()):
        for entry in entries or []:
            # Scheduled (eta) tasks come wrapped: {"eta", "priority", "request": {...}}.
            request = entry.get("request", entry)
            tasks.append(
                TaskRead(
                    id=str(request.get("id")),
                    name=request.get("name"),
                    worker=worker,
                    args=_as_list(request.get("args")),
                    state=state,
                    time_start=_timestamp(request.get("time_start")),
                    eta=entry.get("eta"),
                )
            )
    return tasks


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [] if value is None else [value]


def _timestamp(value: Any) -> datetime | None:
    # Workers report time_start as a Unix timestamp.
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return None


def task_state(session: Session, task_id: str) -> TaskStateRead:
    names = _worker_names()
    for worker, found in sorted(_ask(names, "query_task", task_id).items()):
        if found and task_id in found:
            state, info = found[task_id]
            return TaskStateRead(
                task_id=task_id,
                state=str(state),
                source="worker",
                worker=worker,
                name=(info or {}).get("name"),
                poll_run=_poll_run_read(_poll_run(session, task_id)),
            )
    queued = _find_queued(task_id)
    if queued is not None:
        queue, name = queued
        return TaskStateRead(
            task_id=task_id, state="queued", source="queue", queue=queue, name=name
        )
    run = _poll_run(session, task_id)
    if run is None:
        raise NotFound(
            f"task {task_id} is not held by any worker, not waiting in a queue and not "
            "recorded by any poll run (only polls record their outcome: there is no result "
            "backend)"
        )
    return TaskStateRead(
        task_id=task_id,
        state=run.outcome,
        source="database",
        name="mailbox.poll",
        poll_run=_poll_run_read(run),
    )


def _find_queued(task_id: str) -> tuple[str, str | None] | None:
    needle = task_id.encode()
    try:
        with redis.probe() as client:
            for queue in app.conf.task_queues:
                for key in queue_keys(queue.name):
                    for raw in client.lrange(key, 0, QUEUE_SCAN_LIMIT - 1):
                        if needle not in raw:
                            continue
                        headers = json.loads(raw).get("headers") or {}
                        if headers.get("id") == task_id:
                            return queue.name, headers.get("task")
    except Exception as exc:
        raise ServiceUnavailable(
            f"the Celery queues could not be read ({type(exc).__name__})"
        ) from exc
    return None


def _poll_run(session: Session, task_id: str) -> PollRun | None:
    return session.scalar(
        select(PollRun).where(PollRun.task_id == task_id).order_by(PollRun.id.desc()).limit(1)
    )


def _poll_run_read(run: PollRun | None) -> PollRunRead | None:
    return None if run is None else PollRunRead.model_validate(run)


def retry_task(session: Session, task_id: str) -> RetryRead:
    """Run a finished poll again: its account is polled now, under a new task id.
    A poll is the only task whose arguments SQL keeps (its poll run names the account)."""
    run = _poll_run(session, task_id)
    if run is None:
        raise NotFound(
            f"task {task_id} cannot be retried: no poll run records it. Only polls can be "
            "retried (there is no result backend, so other tasks' arguments are not kept; "
            "failed webhook deliveries are replayed through the processing routes)"
        )
    stale_after = timedelta(seconds=get_settings().poll_time_limit_seconds)
    if run.outcome == PollOutcome.RUNNING and utcnow() - run.started_at < stale_after:
        raise Conflict(
            f"task {task_id} is still running (poll run {run.id} started at "
            f"{run.started_at.isoformat()}); retry it once it has finished"
        )
    account = session.get(Account, run.account_id)
    if account is None or not account.enabled:
        raise Conflict(
            f"task {task_id} polled account {run.account_id}, which is disabled or gone; "
            "enable it first"
        )
    require_scheduler()
    new_id = schedules.enqueue_poll(account.id)
    return RetryRead(task_id=new_id, retry_of=task_id, account_id=account.id)


# -- activity ----------------------------------------------------------------------------

ACTIVITY_BUCKETS = 30


def activity(session: Session, *, minutes: int) -> ActivityRead:
    """Polls finished in the last `minutes`, in ACTIVITY_BUCKETS buckets, counted in SQL
    (on the finished_at index) so a busy day stays one cheap query."""
    bucket_seconds = max(1, minutes * 60 // ACTIVITY_BUCKETS)
    now = utcnow()
    start = now - timedelta(seconds=bucket_seconds * ACTIVITY_BUCKETS)
    index = cast(
        func.floor((epoch(session, PollRun.finished_at) - start.timestamp()) / bucket_seconds),
        Integer,
    ).label("bucket")
    rows = session.execute(
        select(
            index,
            func.count(),
            func.sum(case((PollRun.outcome.in_(FAILED_POLL_OUTCOMES), 1), else_=0)),
            func.sum(PollRun.messages_count),
        )
        .where(PollRun.finished_at >= start)
        .group_by(index)
    ).all()
    counts = {int(row[0]): row for row in rows}
    buckets = []
    for number in range(ACTIVITY_BUCKETS):
        row = counts.get(number)
        buckets.append(
            ActivityBucket(
                start=start + timedelta(seconds=number * bucket_seconds),
                polls=int(row[1]) if row else 0,
                failed=int(row[2] or 0) if row else 0,
                messages=int(row[3] or 0) if row else 0,
            )
        )
    return ActivityRead(bucket_seconds=bucket_seconds, buckets=buckets)


# -- health ------------------------------------------------------------------------------


class CheckFailed(Exception):
    """A health check's own verdict, shown as it is."""


def _check_database() -> str:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
    return "ok"


def _check_redis() -> str:
    with redis.probe() as client:
        client.ping()
    return "ok"


def _check_storage() -> str:
    ok, detail = storage.health()
    if not ok:
        log.warning("health: storage: %s", detail)
        raise CheckFailed("object storage does not answer; writes go to local files")
    return "ok" if detail in ("", "ok") else f"ok: {detail}"


def _check_workers() -> str:
    try:
        _check_redis()
    except Exception as exc:
        # Celery would retry its connection for a long while; say why at once instead.
        raise CheckFailed("Redis does not answer, so no worker can be asked") from exc
    count = len(_inspect("ping"))
    if not count:
        timeout = get_settings().celery_inspect_timeout_seconds
        raise CheckFailed(f"no worker answered a ping within {timeout:g}s")
    return f"ok ({count} worker{'s' if count != 1 else ''})"


def _check_polls() -> str:
    """Degraded when the workers fall behind the schedule: the oldest queued poll has
    waited longer than POLL_LAG_DEGRADED_SECONDS."""
    with session_scope() as session:
        result = schedules.capacity(session)
    if result.behind:
        raise CheckFailed(
            f"behind: the oldest queued poll has waited {result.oldest_pending_seconds:g}s "
            f"(POLL_LAG_DEGRADED_SECONDS={get_settings().poll_lag_degraded_seconds}); "
            f"{result.completed_polls_per_second:g} polls/s completed of "
            f"{result.demanded_polls_per_second:g} demanded: add workers"
        )
    return "ok"


def _check_freshness() -> str:
    """Degraded when a scheduled mailbox has had no complete poll within its freshness
    limit (backend/audit/freshness.py): how many, and the worst."""
    with session_scope() as session:
        found = freshness.staleness(session)
    if found.stale:
        raise CheckFailed(
            f"{found.stale} stale mailbox{'es' if found.stale != 1 else ''} (no complete "
            f"poll within the freshness limit); the worst: account {found.worst_account_id}, "
            f"last complete poll {found.worst_seconds:g}s ago (limit "
            f"{found.worst_limit_seconds:g}s)"
        )
    return "ok"


CHECK_NAMES = ("database", "redis", "celery_worker", "polls", "freshness", "storage")


class HealthCache:
    """/health answers without a token: one check at a time, its result reused for
    HEALTH_CACHE_SECONDS (backend/singleflight.py)."""

    def __init__(self) -> None:
        self._shared = SharedResult(
            run_checks,
            fresh_seconds=_cache_seconds,
            wait_seconds=lambda: _checks_timeout() + 1,
        )

    def get(self) -> tuple[HealthRead, bool]:
        return self._shared.get() or _still_checking()


def _cache_seconds() -> float:
    return get_settings().health_cache_seconds


def _checks_timeout() -> float:
    settings = get_settings()
    return settings.health_check_timeout_seconds + settings.celery_inspect_timeout_seconds


def _still_checking() -> tuple[HealthRead, bool]:
    checks = {name: "error: the check in progress has not finished" for name in CHECK_NAMES}
    return HealthRead(status=HealthStatus.UNHEALTHY, checks=checks), False


def run_checks() -> tuple[HealthRead, bool]:
    """Every check runs at once, each bounded by HEALTH_CHECK_TIMEOUT_SECONDS. The database
    down is unhealthy (503); anything else failing is degraded: the API still answers and
    the stored data is safe, but polling or storage needs attention."""
    local = dispatch.mode() == SchedulerMode.LOCAL
    checks: dict[str, Callable[[], str]] = {
        "database": _check_database,
        "storage": _check_storage,
        "freshness": _check_freshness,
    }
    if not local:
        checks["redis"] = _check_redis
        checks["celery_worker"] = _check_workers
        checks["polls"] = _check_polls
    timeout = _checks_timeout()
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="health")
    try:
        futures = {name: pool.submit(check) for name, check in checks.items()}
        results: dict[str, str] = {}
        failed: set[str] = set()
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=timeout)
            except FutureTimeout:
                results[name] = f"error: no answer within {timeout:g}s"
                failed.add(name)
            except Exception as exc:
                results[name] = f"error: {_reason(name, exc)}"
                failed.add(name)
    finally:
        # A hung check keeps its thread until its own socket timeout; nobody waits for it.
        pool.shutdown(wait=False, cancel_futures=True)
    if local:
        results["redis"] = "not used (local mode)"
        results["celery_worker"] = "not used (local mode: polls run in the API process)"
        results["polls"] = "not measured (local mode)"
    if "database" in failed:
        status = HealthStatus.UNHEALTHY
    elif failed:
        status = HealthStatus.DEGRADED
    else:
        status = HealthStatus.HEALTHY
    ordered = {name: results[name] for name in CHECK_NAMES}
    return HealthRead(status=status, checks=ordered), status != HealthStatus.UNHEALTHY


def _reason(name: str, exc: Exception) -> str:
    """What an unauthenticated caller may see. A driver's message names hosts, ports and
    roles (`connection to server at "db" (10.0.0.5), port 5432 failed: FATAL: role ...`),
    so it goes to the log only."""
    if isinstance(exc, CheckFailed):
        return str(exc)
    log.warning("health: %s: %s: %s", name, type(exc).__name__, exc)
    return "cannot connect"
