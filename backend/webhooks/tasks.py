from __future__ import annotations

from backend.celery_app import app
from backend.webhooks import service


@app.task(name=service.DELIVER_TASK, acks_late=True)
def deliver(delivery_id: int) -> str:
    """One attempt; a retry is a new task with a countdown (see service.deliver)."""
    return service.deliver(delivery_id)
