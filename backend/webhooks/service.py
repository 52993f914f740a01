"""Webhook deliveries: one row per (event, target), created in the transaction that
decides the event, sent after it commits, retried with backoff, dead-lettered when
retries run out, replayed on request.

An attempt claims its row (`claimed_until`) in a short transaction, sends without
holding one, and records the answer in another; a duplicate task finds the row claimed
or already delivered and does nothing. A worker dying mid-attempt leaves the claim to
expire, and the event may then be sent again: receivers drop repeats by event id.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from backend import crypto, paging
from backend.config import get_settings
from backend.db import session_scope
from backend.dispatch import enqueue, register
from backend.errors import NotFound
from backend.models import (
    ACCOUNT_EVENTS,
    Account,
    DeliveryStatus,
    DeliveryTarget,
    EventType,
    Message,
    WebhookDelivery,
    utcnow,
)
from backend.webhooks import client, events, signing

log = logging.getLogger(__name__)

# A task that arrives this much before the row's due time still sends (clock skew).
EARLY_GRACE = timedelta(seconds=1)
# A pending delivery this far past its due time has lost its task (Redis was flushed,
# a worker died); the sweep sends it again.
SWEEP_GRACE = timedelta(minutes=5)
# An attempt's claim lasts its request's timeouts plus this, for recording the answer.
# A claim that ran out means the attempt died mid-request (a killed worker): the sweep
# sends it again at once, and the receiver drops the repeat by its event id.
CLAIM_SLACK = timedelta(seconds=10)
# Longer waits are split: a task arriving early sends itself on again (see deliver). A
# worker holds countdown tasks unacknowledged, and Redis hands out again any kept past
# its visibility timeout, so an hour-long countdown would be a pile of duplicates.
MAX_COUNTDOWN_SECONDS = 300.0

DELIVER_TASK = "webhook.deliver"


@dataclass(frozen=True)
class Target:
    kind: DeliveryTarget
    url: str
    secret: str | None


def targets(account: Account) -> list[Target]:
    """Where an account's events go: the global webhook, then the account's own."""
    found = []
    for kind in DeliveryTarget:
        target = resolve_target(kind, account)
        if target is not None:
            found.append(target)
    return found


def resolve_target(kind: DeliveryTarget, account: Account) -> Target | None:
    """Read at every attempt, so a fixed URL or a rotated secret applies to retries and
    replays too."""
    if kind == DeliveryTarget.GLOBAL:
        settings = get_settings()
        if not settings.webhook_url:
            return None
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        return Target(DeliveryTarget.GLOBAL, settings.webhook_url, secret or None)
    if not account.webhook_url:
        return None
    secret = (
        crypto.decrypt(account.webhook_secret_encrypted)
        if account.webhook_secret_encrypted
        else None
    )
    return Target(DeliveryTarget.ACCOUNT, account.webhook_url, secret or None)


def _create(
    session: Session,
    account: Account,
    event_type: EventType,
    dedupe_key: str,
    *,
    message_id: int | None = None,
    data: dict[str, object] | None = None,
) -> list[int]:
    existing = set(
        session.scalars(
            select(WebhookDelivery.target).where(WebhookDelivery.dedupe_key == dedupe_key)
        )
    )
    created = []
    for target in targets(account):
        if target.kind in existing:
            continue
        delivery = WebhookDelivery(
            event_id=f"evt_{uuid.uuid4().hex}",
            event_type=event_type,
            dedupe_key=dedupe_key,
            target=target.kind,
            account_id=account.id,
            message_id=message_id,
            data=data,
            url=target.url,
            next_attempt_at=utcnow(),
        )
        session.add(delivery)
        created.append(delivery)
    session.flush()
    return [delivery.id for delivery in created]


def create_message_deliveries(
    session: Session, message: Message, *, redeliver: bool = False
) -> list[int]:
    """The message.received deliveries of a message, once per target; `redeliver` makes
    new ones (new event ids) for a message already delivered. Only flushes."""
    key = f"{EventType.MESSAGE_RECEIVED}:{message.id}"
    if redeliver:
        key += f":redeliver:{uuid.uuid4().hex}"
    return _create(session, message.account, EventType.MESSAGE_RECEIVED, key, message_id=message.id)


def create_account_event(session: Session, account: Account, event_type: str) -> list[int]:
    """An account state change, with the account's state as it is now. Only flushes."""
    if event_type not in ACCOUNT_EVENTS:
        raise ValueError(f"unknown account event {event_type!r}")
    key = f"{event_type}:{account.id}:{uuid.uuid4().hex}"
    return _create(session, account, EventType(event_type), key, data=events.account_data(account))


def pending_for_message(session: Session, message_id: int) -> list[int]:
    return list(
        session.scalars(
            select(WebhookDelivery.id).where(
                WebhookDelivery.message_id == message_id,
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
        )
    )


def dispatch(delivery_ids: Sequence[int], *, delay: float = 0.0) -> None:
    """Send deliveries (already committed): a `webhook.deliver` task each, after `delay`
    seconds (a retry)."""
    for delivery_id in delivery_ids:
        enqueue(DELIVER_TASK, delivery_id, countdown=min(delay, MAX_COUNTDOWN_SECONDS) or None)


def deliver(delivery_id: int) -> str:
    """One attempt. Returns what happened: delivered, retry, dead, not_due, in_flight,
    or skipped (gone, or no longer pending)."""
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            return "skipped"
        if delivery.claimed_until is not None and delivery.claimed_until > now:
            return "in_flight"
        if delivery.next_attempt_at > now + EARLY_GRACE:
            wait = (delivery.next_attempt_at - now).total_seconds()
            session.rollback()
            dispatch([delivery_id], delay=wait)
            return "not_due"
        account = session.get(Account, delivery.account_id)
        assert account is not None  # deliveries go with their account (FK cascade)
        target = resolve_target(delivery.target, account)
        if target is None:
            delivery.status = DeliveryStatus.DEAD
            delivery.last_error = f"no {delivery.target} webhook URL is configured any more"
            return "dead"
        body = _body(session, delivery, account)
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.url = target.url
        delivery.claimed_until = (
            now
            + timedelta(
                seconds=settings.webhook_timeout_seconds + settings.webhook_connect_timeout_seconds
            )
            + CLAIM_SLACK
        )
        attempt, event_id, event_type = delivery.attempts, delivery.event_id, delivery.event_type

    result = client.post(target.url, body, _headers(target, event_id, event_type, attempt, body))

    delay = 0.0
    with session_scope() as session:
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None:
            return "skipped"
        delivery.claimed_until = None
        delivery.last_status_code = result.status_code
        if result.ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = utcnow()
            outcome = "delivered"
        elif result.retryable and delivery.attempts < settings.webhook_max_attempts:
            delay = client.retry_delay(delivery.attempts, result.retry_after, settings)
            delivery.next_attempt_at = utcnow() + timedelta(seconds=delay)
            delivery.last_error = result.error
            outcome = "retry"
        else:
            delivery.status = DeliveryStatus.DEAD
            delivery.last_error = result.error
            outcome = "dead"
    log.info(
        "webhook %s %s to %s target, attempt %d: %s%s",
        event_type,
        event_id,
        target.kind,
        attempt,
        outcome,
        f" ({result.error})" if result.error else "",
    )
    if outcome == "retry":
        dispatch([delivery_id], delay=delay)
    return outcome


register(DELIVER_TASK, deliver)


def _body(session: Session, delivery: WebhookDelivery, account: Account) -> bytes:
    if delivery.message_id is not None:
        message = session.get(Message, delivery.message_id)
        assert message is not None  # deliveries go with their message (FK cascade)
        return events.envelope(delivery, events.message_data(message, account))
    return events.envelope(delivery, delivery.data or {})


def _headers(
    target: Target, event_id: str, event_type: str, attempt: int, body: bytes
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        signing.EVENT_ID_HEADER: event_id,
        signing.EVENT_TYPE_HEADER: event_type,
        signing.ATTEMPT_HEADER: str(attempt),
    }
    if target.secret:
        timestamp = int(time.time())
        headers[signing.TIMESTAMP_HEADER] = str(timestamp)
        headers[signing.SIGNATURE_HEADER] = signing.sign(target.secret, timestamp, body)
    return headers


def due_for_sweep(session: Session, *, limit: int = 500) -> list[int]:
    """Pending deliveries whose task was lost (see SWEEP_GRACE), or whose attempt died
    mid-request (see CLAIM_SLACK)."""
    now = utcnow()
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                or_(
                    WebhookDelivery.claimed_until < now,
                    and_(
                        WebhookDelivery.claimed_until.is_(None),
                        WebhookDelivery.next_attempt_at < now - SWEEP_GRACE,
                    ),
                ),
            )
            .order_by(WebhookDelivery.id)
            .limit(limit)
        )
    )


def list_dead_letters(
    session: Session,
    *,
    limit: int,
    offset: int = 0,
    after: int | None = None,
    account_id: int | None = None,
) -> paging.Page[WebhookDelivery]:
    """Dead letters, newest first (on the status, account and id indexes)."""
    query = select(WebhookDelivery)
    within: tuple[Any, Any] = (WebhookDelivery.status, DeliveryStatus.DEAD)
    if account_id is not None:
        query = query.where(WebhookDelivery.status == DeliveryStatus.DEAD)
        within = (WebhookDelivery.account_id, account_id)
    return paging.page(
        session,
        query,
        WebhookDelivery.id,
        limit=limit,
        offset=offset,
        after=after,
        newest_first=True,
        within=within,
    )


def _requeue(deliveries: Sequence[WebhookDelivery]) -> list[int]:
    now = utcnow()
    for delivery in deliveries:
        # A full set of attempts again; the event id stays, the receiver never took it.
        delivery.status = DeliveryStatus.PENDING
        delivery.attempts = 0
        delivery.next_attempt_at = now
        delivery.claimed_until = None
    return [delivery.id for delivery in deliveries]


def replay_dead_letter(session: Session, delivery_id: int) -> list[int]:
    """Only flushes; the caller dispatches the returned ids after committing."""
    delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
    if delivery is None or delivery.status != DeliveryStatus.DEAD:
        raise NotFound(f"dead letter {delivery_id} not found")
    ids = _requeue([delivery])
    session.flush()
    return ids


def replay_account_dead_letters(session: Session, account_id: int) -> list[int]:
    if session.get(Account, account_id) is None:
        raise NotFound(f"account {account_id} not found")
    deliveries = session.scalars(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.account_id == account_id, WebhookDelivery.status == DeliveryStatus.DEAD
        )
        .order_by(WebhookDelivery.id)
        .with_for_update()
    ).all()
    ids = _requeue(deliveries)
    session.flush()
    return ids
