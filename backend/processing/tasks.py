from __future__ import annotations

from backend.celery_app import app
from backend.processing import backfill, reparse
from backend.processing.service import PROCESS_TASK, process_and_send_batch
from backend.processing.service import sweep as sweep_lost_work


# A step that fails (the database away for a moment) is tried again; a message stays
# unprocessed until every step has run in one committed transaction. A retry of a batch
# finds the messages already processed and only does their after-commit work again.
@app.task(
    name=PROCESS_TASK,
    acks_late=True,
    autoretry_for=(Exception,),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=10,
)
def process(message_ids: list[int] | int) -> int:
    """A batch of message ids (an int: one message, a task queued before batches)."""
    return process_and_send_batch(message_ids)


@app.task(name="message.sweep")
def sweep() -> dict[str, int]:
    """Periodic (beat_schedule in backend/celery_app.py)."""
    return sweep_lost_work()


@app.task(name=backfill.RUN_TASK)
def run_backfill(backfill_id: int) -> str:
    return backfill.run(backfill_id)


@app.task(name=reparse.REPARSE_TASK)
def reparse_messages(account_id: int | None, after: int, notify: bool) -> dict[str, object]:
    """Re-parse stored messages above id `after` (of one account, or all); sends itself on."""
    return reparse.run(account_id, after, notify)
