"""/admin: the schedule and Celery; /health for load balancers and monitors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, status
from fastapi.responses import JSONResponse

from backend.admin import service
from backend.admin.schemas import (
    ActivityRead,
    CapacityRead,
    HealthRead,
    ReconcileRead,
    RetryRead,
    ScheduleList,
    TaskList,
    TaskStateRead,
    WorkerList,
)
from backend.deps import AdminDep, After, KnownQueryDep, SessionDep
from backend.errors import error_responses

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[AdminDep, KnownQueryDep],
    responses=error_responses(401, 503),
)
health_router = APIRouter(tags=["health"])

TaskId = Annotated[
    str, Path(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:@-]+$", description="a task id")
]


@router.post("/email-worker/sync")
def sync_schedule(session: SessionDep) -> ReconcileRead:
    """Rebuild the schedule from the database: create missing entries, fix changed ones,
    delete orphans."""
    return service.sync_schedule(session)


@router.post("/celery/tasks/sync")
def sync_celery_tasks(session: SessionDep) -> ReconcileRead:
    """The same as POST /admin/email-worker/sync."""
    return service.sync_schedule(session)


@router.get("/schedules")
def list_schedules(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many")] = 1000,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many")] = 0,
    after: After = None,
) -> ScheduleList:
    """The schedule entries by account id, with interval and last and next run, a page
    at a time (`after` the previous page's `next_after`, or `offset`); `total` counts
    them all. A page reads only its own entries."""
    return service.list_schedule(session, limit=limit, offset=offset, after=after)


@router.get("/capacity")
def capacity(session: SessionDep) -> CapacityRead:
    """Can the workers keep up? Polls per second the schedule demands and the workers
    complete, the poll queue and the wait of its oldest poll."""
    return service.capacity(session)


@router.get("/celery/workers")
def list_workers() -> WorkerList:
    """The workers that answer within CELERY_INSPECT_TIMEOUT_SECONDS: queues and load."""
    return service.list_workers()


@router.get("/celery/tasks")
def list_tasks() -> TaskList:
    """Tasks the workers are running (active), hold (reserved) or wait to run (scheduled)."""
    return service.list_tasks()


@router.get("/celery/tasks/{task_id}", responses=error_responses(404))
def get_task(task_id: TaskId, session: SessionDep) -> TaskStateRead:
    """Where a task is: in a worker, waiting in its queue, or (a finished poll) its outcome."""
    return service.task_state(session, task_id)


@router.post(
    "/celery/tasks/{task_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 409),
)
def retry_task(task_id: TaskId, session: SessionDep) -> RetryRead:
    """Run a finished or failed poll again (a new task for the same mailbox). Other tasks
    cannot be retried here: without a result backend their arguments are not kept."""
    return service.retry_task(session, task_id)


@router.get("/activity")
def activity(
    session: SessionDep,
    minutes: Annotated[
        int, Query(ge=30, le=10_080, description="how far back, in 30 buckets")
    ] = 60,
) -> ActivityRead:
    """Polls, failed polls and messages over time, in 30 buckets."""
    return service.activity(session, minutes=minutes)


@health_router.get(
    "/health",
    response_model=HealthRead,
    responses={503: {"model": HealthRead, "description": "the database is unreachable"}},
)
def health(request: Request) -> JSONResponse:
    """healthy: everything answers; degraded (200): Redis, the workers or storage do not;
    unhealthy (503): the database does not. Checked at most every HEALTH_CACHE_SECONDS;
    a failure says what failed, the log says why."""
    cache: service.HealthCache = request.app.state.health
    result, ok = cache.get()
    return JSONResponse(result.model_dump(), status_code=200 if ok else 503)
