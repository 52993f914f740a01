from __future__ import annotations

from backend.celery_app import app
from backend.webhooks import service


@app.task(name=service.DELIVER_TASK, acks_late=True)
def deliver(delivery_ids: list[int] | int) -> dict[int, str]:
    """One attempt at each delivery of a batch (an int: one delivery, a task queued
    before batches); a retry is a new task with a countdown (see service.deliver_batch)."""
    return service.deliver_batch(delivery_ids)
