"""`audit.run` (one account, on the email queue beside the polls: it is IMAP work),
`audit.schedule` and `freshness.check` (periodic, beat_schedule in backend/celery_app.py,
on the default queue)."""

from __future__ import annotations

from backend.audit import freshness, service
from backend.celery_app import app


@app.task(name=service.RUN_TASK, acks_late=True)
def run(account_id: int, deep: bool = False) -> str:
    return service.run(account_id, deep)


@app.task(name=service.SCHEDULE_TASK)
def schedule() -> int:
    return len(service.schedule_due())


@app.task(name=freshness.CHECK_TASK)
def check_freshness() -> dict[str, list[int]]:
    return freshness.check()
