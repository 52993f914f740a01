"""Processing: what happens to a message after it is ingested.

`hand_on` is called after the ingesting transaction commits; `process_message` runs the
processing step for one message and is idempotent (a message already processed is left).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.orm import Session

from backend.db import session_scope
from backend.models import Message, utcnow

log = logging.getLogger(__name__)


def process_message(session: Session, message_id: int) -> bool:
    """Process one message; returns False when there was nothing to do. Only flushes."""
    message = session.get(Message, message_id, with_for_update=True)
    if message is None or message.processed_at is not None:
        return False
    message.processed_at = utcnow()
    session.flush()
    return True


def after_poll(
    account_id: int,
    new_message_ids: Sequence[int],
    account_event: str | None,
    *,
    use_celery: bool,
) -> None:
    """Everything a poll's caller hands on once the poll has committed: the new messages,
    and the account's state change (account.error / account.disabled / account.recovered)
    when the poll changed it. Account events are delivered by the webhooks work."""
    hand_on(new_message_ids, use_celery=use_celery)


def hand_on(message_ids: Sequence[int], *, use_celery: bool) -> None:
    """Hand newly committed messages to processing: a task each on the workflow queue,
    or, without Celery (local mode), processed right here."""
    if not message_ids:
        return
    if use_celery:
        from backend.processing.tasks import process

        for message_id in message_ids:
            process.apply_async((message_id,), queue="workflow")
        return
    for message_id in message_ids:
        with session_scope() as session:
            process_message(session, message_id)
