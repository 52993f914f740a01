"""`mailbox.poll`: the task beat sends for every mailbox on its interval (queue `email`).

Its soft and hard time limits come from the settings (task_annotations in
backend/celery_app.py) and sit above the IMAP timeouts, so a stuck server is noticed by
IMAP first and the worker kills only a poll that is truly hung.
"""

from __future__ import annotations

import time
from typing import Any

from backend.celery_app import app
from backend.mailbox.lock import mailbox_lock
from backend.mailbox.service import poll_account
from backend.schedules import polling


@app.task(name="mailbox.poll", bind=True, acks_late=True)
def poll(self: Any, account_id: int) -> str:
    """Poll one mailbox; returns the outcome ("stale" and "locked" when it did not run)."""
    task_id = self.request.id
    if not polling.pollable(account_id):
        return "stale"
    started = time.monotonic()
    with mailbox_lock(account_id) as held:
        if not held:
            polling.record_skip(
                account_id, task_id=task_id, reason="another poll of this mailbox is running"
            )
            return "locked"
        result = poll_account(account_id, task_id=task_id)
    polling.finish(account_id, result, time.monotonic() - started)
    return str(result.outcome)
