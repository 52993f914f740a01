"""`mailbox.poll`: the task beat sends for every mailbox on its interval (queue `email`).

Its soft and hard time limits come from the settings (task_annotations in
backend/celery_app.py) and sit above the IMAP timeouts, so a stuck server is noticed by
IMAP first and the worker kills only a poll that is truly hung.
"""

from __future__ import annotations

import time
from typing import Any

from backend.celery_app import app
from backend.mailbox.polling import (
    PRUNE_TASK,
    SWEEP_TASK,
    prune_poll_runs,
    run_poll,
    sweep_dead_polls,
)
from backend.mailbox.progress import Progress
from backend.metrics import record_news_stored
from backend.schedules.service import NEWS_AT_HEADER


@app.task(name="mailbox.poll", bind=True, acks_late=True)
def poll(self: Any, account_id: int, force: bool = False) -> str:
    """Poll one mailbox (`force`: through a backoff); returns the outcome ("stale" and
    "locked" when it did not run)."""
    task_id = self.request.id

    def progress(folders: Progress) -> None:
        # Celery's PROGRESS state, for a deployment with a result backend (without one,
        # the account's sync_progress is where progress shows).
        self.update_state(
            task_id=task_id, state="PROGRESS", meta={"account_id": account_id, "folders": folders}
        )

    done = run_poll(account_id, task_id, force, progress)
    news_at = getattr(self.request, NEWS_AT_HEADER, None)
    if news_at is not None and not isinstance(done, str) and done.new_message_ids:
        # A push poll: how long from the server's news to its messages stored.
        record_news_stored(time.time() - float(news_at))
    return done if isinstance(done, str) else str(done.outcome)


@app.task(name=PRUNE_TASK)
def prune_runs() -> int:
    """Periodic (beat_schedule in backend/celery_app.py, every 10 minutes), on the
    default queue."""
    return prune_poll_runs()


@app.task(name=SWEEP_TASK)
def sweep_polls() -> int:
    """Periodic (beat_schedule in backend/celery_app.py, every MAILBOX_LEASE_SECONDS / 2),
    on the default queue: the runs of polls whose worker died, closed, and their
    mailboxes polled again."""
    return len(sweep_dead_polls())
