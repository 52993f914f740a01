"""Webhook deliveries: one row per (event, target), created in the transaction that
decides the event, sent after it commits, retried with backoff, dead-lettered when
retries run out, replayed on request.

A `webhook.deliver` task sends a batch of deliveries (up to PROCESSING_BATCH_SIZE):
1. claim: one short transaction locks the batch's rows and claims each pending, due,
   unclaimed one (`claimed_until`, long enough for every request of the batch to its
   receiver, WEBHOOK_CONCURRENCY at a time); the others are left to whoever holds them.
   The claimed events' bodies are built here, each on its own: one that cannot be built
   is a dead letter at once, with the reason, and never holds back the batch's others;
2. send: the claimed ones are posted concurrently, with no transaction open, at most
   WEBHOOK_CONCURRENCY at a time to one receiver, over kept-alive connections;
3. record: the answers are written in bulk as they come back (a transaction per group
   of answers, RECORD_EVERY apart), then the retries are sent as delayed tasks.

Exactly once per (event, target): a delivery is sent only under its claim, and the
claim is taken in a transaction that saw the row pending and unclaimed, so a duplicate
task (a redelivered batch, the sweep, an overlapping batch) finds the row claimed or
already delivered and does nothing. A worker dying mid-batch leaves its claims to
expire; the requests it had sent but not recorded may then be sent again with the same
event id, and receivers drop repeats by event id (docs/webhooks.md).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, or_, select, update
from sqlalchemy.orm import Session, selectinload

from backend import crypto, netpolicy, paging
from backend.config import get_settings
from backend.db import bulk_insert, insert_for, session_scope
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
# Answers that come back within this long of each other are recorded in one transaction:
# bulk writes, and a slow receiver does not hold up recording a fast one's answers.
RECORD_EVERY = 0.1

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
    userinfo = (
        crypto.decrypt(account.webhook_userinfo_encrypted)
        if account.webhook_userinfo_encrypted
        else None
    )
    url = netpolicy.with_userinfo(account.webhook_url, userinfo)
    return Target(DeliveryTarget.ACCOUNT, url, secret or None)


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
            url=netpolicy.redact_userinfo(target.url),
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


def create_update_deliveries(session: Session, message: Message) -> list[int]:
    """A message.reparsed event of a message (its parsed fields changed), once per target;
    each change is an event of its own. Only flushes."""
    key = f"{EventType.MESSAGE_REPARSED}:{message.id}:{uuid.uuid4().hex}"
    return _create(session, message.account, EventType.MESSAGE_REPARSED, key, message_id=message.id)


def create_account_event(session: Session, account: Account, event_type: str) -> list[int]:
    """An account state change, with the account's state as it is now. Only flushes."""
    if event_type not in ACCOUNT_EVENTS:
        raise ValueError(f"unknown account event {event_type!r}")
    key = f"{event_type}:{account.id}:{uuid.uuid4().hex}"
    return _create(session, account, EventType(event_type), key, data=events.account_data(account))


def create_batch_deliveries(session: Session, message_ids: Sequence[int]) -> None:
    """The message.received deliveries of a batch of messages, once per (message,
    target): one INSERT for the batch that leaves a row already there as it is (ON
    CONFLICT DO NOTHING on the dedupe key). Only flushes."""
    pairs = session.execute(
        select(Message.id, Message.account_id).where(Message.id.in_(message_ids))
    ).all()
    accounts = session.scalars(
        select(Account).where(Account.id.in_({account_id for _, account_id in pairs}))
    )
    found = {account.id: targets(account) for account in accounts}
    now = utcnow()
    rows = [
        {
            "event_id": f"evt_{uuid.uuid4().hex}",
            "event_type": EventType.MESSAGE_RECEIVED,
            "dedupe_key": f"{EventType.MESSAGE_RECEIVED}:{message_id}",
            "target": target.kind,
            "account_id": account_id,
            "message_id": message_id,
            "url": netpolicy.redact_userinfo(target.url),
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for message_id, account_id in pairs
        for target in found[account_id]
    ]
    if rows:
        insert = insert_for(session, WebhookDelivery).on_conflict_do_nothing(
            index_elements=["dedupe_key", "target"]
        )
        session.execute(insert, rows)


def create_change_deliveries(
    session: Session, account: Account, changes: Sequence[tuple[EventType, dict[str, Any]]]
) -> list[int]:
    """Deliveries of an account's message changes (message.updated / .deleted / .moved,
    backend/mailbox/changes.py), one per (change, target), in one INSERT. Their data is
    kept as the change found it (like an account event's): the message changes later.
    Only flushes; the caller dispatches the returned ids after committing."""
    found = targets(account)
    now = utcnow()
    rows = [
        {
            "event_id": f"evt_{uuid.uuid4().hex}",
            "event_type": event_type,
            "dedupe_key": f"{event_type}:{data['message']['id']}:{uuid.uuid4().hex}",
            "target": target.kind,
            "account_id": account.id,
            "message_id": None,
            "data": data,
            "url": target.url,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }
        for event_type, data in changes
        for target in found
    ]
    if not rows:
        return []
    table = cast(Table, WebhookDelivery.__table__)
    return sorted(row.id for row in bulk_insert(session, table, rows, returning=("id",)))


def pending_for_messages(session: Session, message_ids: Sequence[int]) -> list[int]:
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.message_id.in_(message_ids),
                WebhookDelivery.status == DeliveryStatus.PENDING,
            )
            .order_by(WebhookDelivery.id)
        )
    )


def dispatch(delivery_ids: Sequence[int], *, delay: float = 0.0) -> None:
    """Send deliveries (already committed): a `webhook.deliver` task per
    PROCESSING_BATCH_SIZE of them, after `delay` seconds (a retry)."""
    size = get_settings().processing_batch_size
    ids = list(delivery_ids)
    for start in range(0, len(ids), size):
        enqueue(
            DELIVER_TASK,
            ids[start : start + size],
            countdown=min(delay, MAX_COUNTDOWN_SECONDS) or None,
        )


@dataclass(frozen=True)
class _Attempt:
    delivery_id: int
    target: Target
    number: int
    event_id: str
    event_type: str
    request: client.Request


def deliver(delivery_id: int) -> str:
    """One attempt at one delivery (`deliver_batch`). Returns what happened: delivered,
    retry, dead, not_due, in_flight, or skipped (gone, or no longer pending)."""
    return deliver_batch([delivery_id]).get(delivery_id, "skipped")


def deliver_batch(delivery_ids: int | Sequence[int]) -> dict[int, str]:
    """One attempt at each delivery: claim, send concurrently, record (see the module's
    docstring). Returns what happened to each, as `deliver` says. An int is one delivery
    (a task queued before batches)."""
    ids = [delivery_ids] if isinstance(delivery_ids, int) else list(delivery_ids)
    outcomes = dict.fromkeys(ids, "skipped")
    not_due: dict[int, list[int]] = defaultdict(list)  # whole seconds to wait -> ids
    with session_scope() as session:
        attempts = _claim(session, ids, outcomes, not_due)
    for seconds, waiting in not_due.items():
        dispatch(waiting, delay=seconds)

    answers = client.post_concurrently(
        [attempt.request for attempt in attempts],
        get_settings().webhook_concurrency,
        report_every=RECORD_EVERY,
    )
    for group in answers:
        retries: dict[int, list[int]] = defaultdict(list)
        with session_scope() as session:
            answered = [(attempts[index], result) for index, result in group]
            _record(session, answered, outcomes, retries)
        for seconds, again in retries.items():
            dispatch(again, delay=seconds)
    if len(attempts) > 1:
        log.info("webhooks: %d attempts: %s", len(attempts), dict(Counter(outcomes.values())))
    return outcomes


register(DELIVER_TASK, deliver_batch)


def _claim(
    session: Session,
    ids: Sequence[int],
    outcomes: dict[int, str],
    not_due: dict[int, list[int]],
) -> list[_Attempt]:
    """Claim the batch's deliveries that are pending, unclaimed and due, and build their
    requests; notes the others in `outcomes` and `not_due`. An event that cannot be built
    becomes a dead letter here. Only flushes."""
    settings = get_settings()
    now = utcnow()
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids))
        .order_by(WebhookDelivery.id)
        .with_for_update()
    ).all()
    accounts = {
        account.id: account
        for account in session.scalars(
            select(Account).where(Account.id.in_({row.account_id for row in rows}))
        )
    }
    resolved: dict[tuple[DeliveryTarget, int], Target | None] = {}
    sendable: list[tuple[WebhookDelivery, Target]] = []
    for delivery in rows:
        if delivery.status != DeliveryStatus.PENDING:
            continue
        if delivery.claimed_until is not None and delivery.claimed_until > now:
            outcomes[delivery.id] = "in_flight"
            continue
        if delivery.next_attempt_at > now + EARLY_GRACE:
            wait = (delivery.next_attempt_at - now).total_seconds()
            not_due[math.ceil(wait)].append(delivery.id)
            outcomes[delivery.id] = "not_due"
            continue
        key = (delivery.target, delivery.account_id)
        if key not in resolved:
            resolved[key] = resolve_target(delivery.target, accounts[delivery.account_id])
        target = resolved[key]
        if target is None:
            delivery.status = DeliveryStatus.DEAD
            delivery.last_error = f"no {delivery.target} webhook URL is configured any more"
            outcomes[delivery.id] = "dead"
            continue
        sendable.append((delivery, target))

    messages = _messages(session, [delivery for delivery, _ in sendable])
    built: list[tuple[WebhookDelivery, Target, bytes]] = []
    for delivery, target in sendable:
        try:
            body = _body(delivery, accounts[delivery.account_id], messages)
        except Exception as exc:
            # An event that cannot be built at all (what a message's headers or storage do
            # is handled in the event itself) is a dead letter alone, with the reason: the
            # batch's other events still go out. A replay builds it again.
            # No traceback: its frames may quote the message's content.
            log.error(
                "webhook %s %s: the event could not be built: %s",
                delivery.event_type,
                delivery.event_id,
                events.reason(exc),
            )
            delivery.status = DeliveryStatus.DEAD
            delivery.attempts += 1
            delivery.last_attempt_at = now
            delivery.last_error = f"the event could not be built: {events.reason(exc)}"
            outcomes[delivery.id] = "dead"
            continue
        built.append((delivery, target, body))
    # A receiver takes its requests WEBHOOK_CONCURRENCY at a time: the claim covers every
    # round of the batch to it, or a late request could go out after its claim ran out.
    per_origin = Counter(client.origin(target.url) for _, target, _ in built)
    attempt_seconds = settings.webhook_timeout_seconds + settings.webhook_connect_timeout_seconds
    attempts = []
    for delivery, target, body in built:
        rounds = math.ceil(per_origin[client.origin(target.url)] / settings.webhook_concurrency)
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.url = netpolicy.redact_userinfo(target.url)
        delivery.claimed_until = now + timedelta(seconds=rounds * attempt_seconds) + CLAIM_SLACK
        headers = _headers(target, delivery.event_id, delivery.event_type, delivery.attempts, body)
        attempts.append(
            _Attempt(
                delivery.id,
                target,
                delivery.attempts,
                delivery.event_id,
                delivery.event_type,
                client.Request(target.url, body, headers),
            )
        )
    session.flush()
    return attempts


def _record(
    session: Session,
    answered: Sequence[tuple[_Attempt, client.AttemptResult]],
    outcomes: dict[int, str],
    retries: dict[int, list[int]],
) -> None:
    """Write the answers of a group of attempts; the retries go in `retries` (whole
    seconds to wait -> ids), to be sent after the commit. Only flushes."""
    settings = get_settings()
    rows = {
        delivery.id: delivery
        for delivery in session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.id.in_([attempt.delivery_id for attempt, _ in answered]))
            .order_by(WebhookDelivery.id)
            .with_for_update()
        )
    }
    now = utcnow()
    for attempt, result in answered:
        delivery = rows.get(attempt.delivery_id)
        if delivery is None:
            continue  # deleted with its account meanwhile
        delivery.claimed_until = None
        delivery.last_status_code = result.status_code
        if result.ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = now
            outcome = "delivered"
        elif result.retryable and delivery.attempts < settings.webhook_max_attempts:
            delay = client.retry_delay(delivery.attempts, result.retry_after, settings)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            delivery.last_error = result.error
            retries[math.ceil(delay)].append(delivery.id)
            outcome = "retry"
        else:
            delivery.status = DeliveryStatus.DEAD
            delivery.last_error = result.error
            outcome = "dead"
        outcomes[attempt.delivery_id] = outcome
        log.log(
            logging.DEBUG if outcome == "delivered" else logging.INFO,
            "webhook %s %s to %s target, attempt %d: %s%s",
            attempt.event_type,
            attempt.event_id,
            attempt.target.kind,
            attempt.number,
            outcome,
            f" ({result.error})" if result.error else "",
        )
    session.flush()


def _messages(session: Session, deliveries: Sequence[WebhookDelivery]) -> dict[int, Message]:
    """The messages the deliveries announce, with their attachments, in two queries."""
    ids = {delivery.message_id for delivery in deliveries if delivery.message_id is not None}
    if not ids:
        return {}
    query = select(Message).where(Message.id.in_(ids)).options(selectinload(Message.attachments))
    return {message.id: message for message in session.scalars(query)}


def _body(delivery: WebhookDelivery, account: Account, messages: dict[int, Message]) -> bytes:
    if delivery.message_id is not None:
        message = messages.get(delivery.message_id)
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


def replay_dead_letters(
    session: Session, *, delivery_id: int | None = None, account_id: int | None = None
) -> list[int]:
    """Queue dead letters again (one, an account's, or all) with a full set of attempts;
    the event id stays, the receiver never took it. Only flushes; the caller dispatches
    the returned ids after committing. One UPDATE ... RETURNING: two replays racing send
    a dead letter once."""
    if account_id is not None and session.get(Account, account_id) is None:
        raise NotFound(f"account {account_id} not found")
    query = update(WebhookDelivery).where(WebhookDelivery.status == DeliveryStatus.DEAD)
    if delivery_id is not None:
        query = query.where(WebhookDelivery.id == delivery_id)
    if account_id is not None:
        query = query.where(WebhookDelivery.account_id == account_id)
    ids = sorted(
        session.scalars(
            query.values(
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=utcnow(),
                claimed_until=None,
            ).returning(WebhookDelivery.id)
        )
    )
    if delivery_id is not None and not ids:
        raise NotFound(f"dead letter {delivery_id} not found")
    return ids
