"""Processing: what happens to a message after it is ingested.

`hand_on` is called after the ingesting transaction commits. Each message runs through
the registered steps (backend/processing/handlers.py) in one transaction that also marks
it processed, so processing it again does nothing; then each step's after-commit work
runs (sending its webhooks).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import dispatch
from backend.db import session_scope
from backend.models import Account, Message, utcnow
from backend.processing import handlers
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

PROCESS_TASK = "message.process"


def process_message(session: Session, message_id: int) -> bool:
    """Run every step for one message; returns False when there was nothing to do
    (unknown, or already processed). Only flushes."""
    message = session.get(Message, message_id, with_for_update=True)
    if message is None or message.processed_at is not None:
        return False
    for handler in handlers.registered():
        handler.run(session, message)
    message.processed_at = utcnow()
    session.flush()
    return True


def process_and_send(message_id: int) -> bool:
    """A boundary: process in one transaction, then the steps' after-commit work."""
    with session_scope() as session:
        processed = process_message(session, message_id)
    for handler in handlers.registered():
        if handler.after_commit is not None:
            handler.after_commit(message_id)
    return processed


dispatch.register(PROCESS_TASK, process_and_send)


def after_poll(
    account_id: int,
    new_message_ids: Sequence[int],
    account_event: str | None,
) -> None:
    """Everything a poll's caller hands on once the poll has committed: the account's
    state change (account.error / account.disabled / account.recovered) when the poll
    changed it, and the new messages."""
    if account_event is not None:
        emit_account_event(account_id, account_event)
    hand_on(new_message_ids)


def emit_account_event(account_id: int, event_type: str) -> None:
    with session_scope() as session:
        account = session.get(Account, account_id)
        if account is None:
            return
        delivery_ids = webhooks.create_account_event(session, account, event_type)
    webhooks.dispatch(delivery_ids)


def sweep(*, limit: int = 500) -> dict[str, int]:
    """Pick up work whose task was lost (Redis flushed, a worker killed before acking):
    messages never processed and deliveries well past due. Run periodically; what it
    sends twice is harmless (processing and delivery attempts are idempotent)."""
    cutoff = utcnow() - webhooks.SWEEP_GRACE
    with session_scope() as session:
        message_ids = list(
            session.scalars(
                select(Message.id)
                .where(Message.processed_at.is_(None), Message.ingested_at < cutoff)
                .order_by(Message.id)
                .limit(limit)
            )
        )
        delivery_ids = webhooks.due_for_sweep(session, limit=limit)
    if message_ids or delivery_ids:
        log.warning(
            "sweep: %d messages never processed, %d deliveries past due: sending them again",
            len(message_ids),
            len(delivery_ids),
        )
    hand_on(message_ids)
    webhooks.dispatch(delivery_ids)
    return {"messages": len(message_ids), "deliveries": len(delivery_ids)}


def hand_on(message_ids: Sequence[int]) -> None:
    """Hand newly committed messages to processing: a `message.process` task each (on
    the workflow queue, or run here in local mode, where one message's failure is
    logged and does not hold back the others)."""
    for message_id in message_ids:
        dispatch.enqueue(PROCESS_TASK, message_id)
