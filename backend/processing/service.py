"""Processing: what happens to a message after it is ingested.

`hand_on` is called after the ingesting transaction commits and sends the new messages
in batches (PROCESSING_BATCH_SIZE) as `message.process` tasks. A batch runs through the
registered steps (backend/processing/handlers.py) in one transaction that also marks its
messages processed, so processing them again does nothing; then each step's
after-commit work runs (sending the batch's webhooks). A batch whose transaction fails
is processed again one message per transaction, so one bad message does not hold back
the others. A message that fails keeps the reason and the time (`process_error`,
`process_failed_at`), and counts the failure (`process_failures`) only when processing
was seen to work since its previous failed attempt (since it was ingested, for its
first): another message was processed meanwhile, by this attempt (others of its batch)
or by any process (backend/processing/progress.py). After MAX_PROCESS_FAILURES it is
quarantined (`quarantined_at`): it is no longer retried, the sweep leaves it, and it
waits to be listed and replayed after a fix (backend/processing/quarantine.py).

Why this rule. A failure alone cannot say whether the message is at fault or something
every message needs (a handler's service, the database) is down; what others did
meanwhile can. A poison message fails while the rest flow, so each of its attempts
finds a success since the one before and counts, whether it was handed on in a batch,
alone (a mailbox that gets one message per poll; evidence from any mailbox counts), by
its task's retry or by the sweep. In an outage nothing is processed, so nothing counts
however long it lasts and however often messages are retried; at most the first
failure of a message ingested before the last success counts, once per outage. A
handler failing for one account only (its credentials at a CRM revoked) fails every
message of that account while the others flow: its messages are quarantined like
poison ones, on purpose. The account's fault is as local as a message's, and retrying
its messages for ever would let them take the sweep's every turn; they are listed and
replayed by account in one call once it is fixed. Two processes failing the same
message at once (a redelivered task and the sweep) count it once, unless a success came
between: the increment is computed under the row's lock, against the
`process_failed_at` the other just wrote. The happy path pays no round trip per
message for this (progress.py paces its writes); a failed attempt reads one key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from backend import dispatch
from backend.config import get_settings
from backend.db import session_scope
from backend.models import Account, Message, utcnow
from backend.processing import handlers, progress
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

PROCESS_TASK = "message.process"
# Counted failures of a message (others were processed since each) after which it is
# quarantined: not retried by its task, skipped by the sweep, until it is replayed.
MAX_PROCESS_FAILURES = 10
# A failure's reason, as the message row keeps it.
PROCESS_ERROR_MAX = 500


class ProcessingFailed(Exception):
    """Some messages of a batch could not be processed (each failure is logged); the
    others were."""


def process_batch(session: Session, message_ids: Sequence[int]) -> list[int]:
    """Run every step for the messages that are not processed yet and mark them
    processed; returns their ids (unknown and already processed ones are left out).
    Only flushes.

    The rows are locked first, in id order: a concurrent attempt at the same messages
    (a redelivered task, the sweep) waits for this transaction and then finds them
    processed."""
    claimed = list(
        session.scalars(
            select(Message.id)
            .where(Message.id.in_(sorted(set(message_ids))), Message.processed_at.is_(None))
            .order_by(Message.id)
            .with_for_update()
        )
    )
    if not claimed:
        return []
    steps = handlers.registered()
    messages: list[Message] = []
    if any(step.run is not None for step in steps):
        messages = list(
            session.scalars(select(Message).where(Message.id.in_(claimed)).order_by(Message.id))
        )
    for step in steps:
        if step.run_batch is not None:
            step.run_batch(session, claimed)
        if step.run is not None:
            for message in messages:
                step.run(session, message)
    now = utcnow()
    # A quarantined message handed on another way (a backfill) and processed now is no
    # longer set aside.
    session.execute(
        update(Message).where(Message.id.in_(claimed)).values(processed_at=now, quarantined_at=None)
    )
    # Message objects this session holds (the steps', a caller's) show the change too: a
    # bulk UPDATE leaves them as they were loaded.
    done = set(claimed)
    for held in list(session.identity_map.values()):
        if isinstance(held, Message) and held.id in done:
            set_committed_value(held, "processed_at", now)
            set_committed_value(held, "quarantined_at", None)
    return claimed


def process_message(session: Session, message_id: int) -> bool:
    """`process_batch` for one message: False when there was nothing to do."""
    return bool(process_batch(session, [message_id]))


def process_and_send_batch(message_ids: int | Sequence[int]) -> int:
    """A boundary: process the messages in one transaction, then the steps' after-commit
    work; returns how many were processed now. An int is one message (a task queued
    before batches). Raises ProcessingFailed, after handing the others on, when some
    messages could not be processed and have failures left: the task is retried for
    them."""
    ids = [message_ids] if isinstance(message_ids, int) else list(message_ids)
    failed: dict[int, str] = {}
    try:
        with session_scope() as session:
            processed = len(process_batch(session, ids))
    except Exception:
        log.exception("processing %d messages failed: one at a time now", len(ids))
        processed, failed = _one_at_a_time(ids)
    if processed:
        progress.succeeded()
    done = [message_id for message_id in ids if message_id not in failed]
    for step in handlers.registered():
        if step.after_commit_batch is not None and done:
            step.after_commit_batch(done)
        if step.after_commit is not None:
            for message_id in done:
                step.after_commit(message_id)
    retry = _record_failures(failed)
    if retry:
        raise ProcessingFailed(f"messages {retry} could not be processed (see the log)")
    return processed


def _one_at_a_time(message_ids: Sequence[int]) -> tuple[int, dict[int, str]]:
    """Each message in its own transaction; returns how many were processed and the
    reason of each that failed."""
    processed, failed = 0, {}
    for message_id in message_ids:
        try:
            with session_scope() as session:
                processed += len(process_batch(session, [message_id]))
        except Exception as exc:
            log.exception("processing message %s failed", message_id)
            failed[message_id] = f"{type(exc).__name__}: {exc}"[:PROCESS_ERROR_MAX]
    return processed, failed


def _record_failures(failed: dict[int, str]) -> list[int]:
    """Keep each message's reason and the time, and count the failure of those that
    failed after processing was seen to work since their previous failure (a short
    transaction of its own); returns those to retry. Those that reached
    MAX_PROCESS_FAILURES are quarantined instead."""
    if not failed:
        return []
    try:
        worked_at = progress.last_success()
        previous = func.coalesce(Message.process_failed_at, Message.ingested_at)
        counted = 0 if worked_at is None else case((previous < worked_at, 1), else_=0)
        with session_scope() as session:
            counts = dict(
                session.execute(
                    update(Message)
                    .where(Message.id.in_(failed), Message.processed_at.is_(None))
                    .values(
                        process_failures=Message.process_failures + counted,
                        process_error=case(failed, value=Message.id),
                        process_failed_at=utcnow(),
                    )
                    .returning(Message.id, Message.process_failures)
                ).all()
            )
            reached = [i for i, failures in counts.items() if failures >= MAX_PROCESS_FAILURES]
            if reached:
                session.execute(
                    update(Message)
                    .where(Message.id.in_(reached), Message.quarantined_at.is_(None))
                    .values(quarantined_at=utcnow())
                )
    except Exception:
        # Not counted (the database is away?): retried like any failure.
        log.exception("the failures of messages %s could not be recorded", sorted(failed))
        return sorted(failed)
    for message_id, failures in sorted(counts.items()):
        if failures >= MAX_PROCESS_FAILURES:
            log.error(
                "message %s failed processing %d times: quarantined until replayed (%s)",
                message_id,
                failures,
                failed[message_id],
            )
    return sorted(i for i, failures in counts.items() if failures < MAX_PROCESS_FAILURES)


def process_and_send(message_id: int) -> bool:
    """`process_and_send_batch` for one message: False when there was nothing to do."""
    return bool(process_and_send_batch([message_id]))


dispatch.register(PROCESS_TASK, process_and_send_batch)


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
    messages never processed (but not quarantined ones) and deliveries
    well past due. Run periodically; what it sends twice is harmless (processing and
    delivery attempts are idempotent)."""
    cutoff = utcnow() - webhooks.SWEEP_GRACE
    with session_scope() as session:
        message_ids = list(
            session.scalars(
                select(Message.id)
                .where(
                    Message.processed_at.is_(None),
                    Message.ingested_at < cutoff,
                    Message.quarantined_at.is_(None),
                )
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
    """Hand newly committed messages to processing: a `message.process` task per
    PROCESSING_BATCH_SIZE messages (on the workflow queue, or run here in local mode,
    where a batch's failure is logged and does not hold back the next)."""
    size = get_settings().processing_batch_size
    ids = list(message_ids)
    for start in range(0, len(ids), size):
        dispatch.enqueue(PROCESS_TASK, ids[start : start + size])
