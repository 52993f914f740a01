"""What the admin routes return."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from backend.models.enums import HealthStatus, SchedulerMode
from backend.paging import NextAfter


class ReconcileRead(BaseModel):
    """What the sync changed in the schedule."""

    created: int
    updated: int
    deleted: int
    unchanged: int


class ScheduleEntryRead(BaseModel):
    account_id: int
    name: str
    interval: int = Field(description="seconds between polls")
    last_run_at: datetime | None
    next_run_at: datetime | None


class ScheduleList(BaseModel):
    mode: SchedulerMode
    items: list[ScheduleEntryRead]
    total: int = Field(description="mailbox entries the schedule holds")
    next_after: NextAfter = None


class CapacityRead(BaseModel):
    """Polls demanded by the schedule against polls completed by the workers."""

    mode: SchedulerMode
    mailboxes: int = Field(description="mailboxes on the schedule")
    demanded_polls_per_second: float = Field(description="the sum of 1/interval")
    completed_polls_per_second: float = Field(description="polls finished, last minute")
    completed_checks_per_second: float = Field(
        description="watchers' checks on held sessions that found nothing new (idle polls "
        "without a task), last minute"
    )
    queue_length: int | None = Field(description="polls waiting (null in local mode)")
    oldest_pending_seconds: float | None = Field(
        description="how long the oldest waiting poll has waited (null: none waiting)"
    )
    interval_stretch: float | None = Field(
        description="demanded / (polls + checks completed), at least 1: how much longer "
        "every interval "
        "really is (null: nothing completed yet)"
    )
    behind: bool = Field(
        description="the oldest waiting poll is older than POLL_LAG_DEGRADED_SECONDS"
    )
    stale_mailboxes: int = Field(
        description="scheduled mailboxes with no complete poll within their freshness limit"
    )


class WorkerRead(BaseModel):
    name: str
    queues: list[str]
    active: int = Field(description="tasks running now")
    concurrency: int | None = Field(description="pool processes")
    processed: int = Field(description="tasks received since the worker started")
    pid: int | None


class WorkerList(BaseModel):
    workers: list[WorkerRead]
    total: int


class TaskRead(BaseModel):
    id: str
    name: str | None
    worker: str
    args: list[Any]
    state: Literal["active", "reserved", "scheduled"]
    time_start: datetime | None = None
    eta: datetime | None = None


class TaskList(BaseModel):
    active: list[TaskRead]
    reserved: list[TaskRead]
    scheduled: list[TaskRead]


class PollRunRead(BaseModel):
    model_config = {"from_attributes": True}

    id: int
    account_id: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    messages_count: int
    bytes_count: int
    error: str | None
    task_id: str | None = None
    duration_seconds: float | None = None


class PollRunList(BaseModel):
    items: list[PollRunRead]
    total: int
    next_after: NextAfter = None


class ActivityBucket(BaseModel):
    start: datetime
    polls: int = Field(description="polls finished in this bucket")
    failed: int = Field(description="of those, polls that failed")
    messages: int = Field(description="messages those polls stored")


class ActivityRead(BaseModel):
    """Polls and messages over time (the load now is GET /admin/capacity)."""

    bucket_seconds: int
    buckets: list[ActivityBucket]


class TaskStateRead(BaseModel):
    """Where the task is now. `state`: active / reserved / scheduled (a worker holds it),
    queued (waiting in Redis), or the recorded outcome of a finished poll."""

    task_id: str
    state: str
    source: Literal["worker", "queue", "database"]
    worker: str | None = None
    queue: str | None = None
    name: str | None = None
    poll_run: PollRunRead | None = None


class RetryRead(BaseModel):
    task_id: str = Field(description="the new task")
    retry_of: str
    account_id: int


class HealthRead(BaseModel):
    status: HealthStatus
    checks: dict[str, str]
