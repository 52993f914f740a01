"""Re-parse stored messages from their raw bytes, so a better parser fixes old rows.

Only what the parser fills changes: the message's parsed columns
(`mailbox.service.parsed_fields`, and `parse_error`) and its attachments' names, types
and content ids. Nothing else is touched: ids, folder, UID, flags, sizes, hashes,
storage keys, `processed_at`, deliveries. Attachments are matched by position and
content hash; when the new parse finds other attachment bytes than those stored (a part
now read as a body, or the other way round), the stored attachments are left as they are
and the message is counted in `attachments_kept`.

Messages go in pages (`PAGE`, one transaction each), in id order, read from the backend
their row names. A message whose raw bytes cannot be read is reported with the reason
and left as it was; the others go on. Nothing is sent unless asked: with `notify`, a
processed message whose parsed fields changed gets a `message.reparsed` event (a message
not processed yet gets its `message.received` with the new fields anyway).

The CLI (`messages reparse`) runs the pages in its process with a progress bar; the API
sends `message.reparse` (workflow queue), which runs `TASK_PAGES` pages and sends itself
on for the rest.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, selectinload

from backend import dispatch
from backend.db import session_scope
from backend.errors import NotFound
from backend.mailbox import parsing
from backend.mailbox.parser import ParsedAttachment
from backend.mailbox.service import parsed_fields
from backend.models import Account, Attachment, Message
from backend.storage import service as storage
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

REPARSE_TASK = "message.reparse"
# Messages per transaction: their raw bytes are read and parsed (in the parsing pool)
# together.
PAGE = 250
# Pages per `message.reparse` task before it sends itself on: a task stays well inside
# the broker's visibility timeout.
TASK_PAGES = 20
# Attachment columns the parser decides (the bytes, hash and key stay).
ATTACHMENT_FIELDS = ("filename", "safe_name", "content_type", "content_id")


@dataclass
class Unreadable:
    message_id: int
    reason: str


@dataclass
class Reparsed:
    """What a run (or a page of it) did."""

    reparsed: int = 0  # read and parsed again
    changed: int = 0  # of those, whose parsed fields changed
    attachments_kept: int = 0  # attachments differ in their bytes: left as they were
    notified: int = 0  # message.reparsed deliveries created
    unreadable: list[Unreadable] = field(default_factory=list)
    last_id: int = 0  # the highest message id looked at

    def add(self, other: Reparsed) -> None:
        self.reparsed += other.reparsed
        self.changed += other.changed
        self.attachments_kept += other.attachments_kept
        self.notified += other.notified
        self.unreadable += other.unreadable
        self.last_id = max(self.last_id, other.last_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reparsed": self.reparsed,
            "changed": self.changed,
            "attachments_kept": self.attachments_kept,
            "notified": self.notified,
            "unreadable": [vars(entry) for entry in self.unreadable],
        }


def _stored(account_id: int | None) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        Message.storage_key.is_not(None),
        Message.storage_backend.is_not(None),
    ]
    if account_id is not None:
        conditions.append(Message.account_id == account_id)
    return conditions


def count(session: Session, account_id: int | None) -> int:
    """The stored messages a run covers (of one account, or all); NotFound for an
    unknown account."""
    if account_id is not None and session.get(Account, account_id) is None:
        raise NotFound(f"account {account_id} not found")
    return (
        session.scalar(select(func.count()).select_from(Message).where(*_stored(account_id))) or 0
    )


def reparse_page(
    account_id: int | None, after: int = 0, *, notify: bool = False, limit: int | None = None
) -> Reparsed:
    """A boundary: the next `limit` stored messages above id `after` re-parsed in one
    transaction (`limit`: PAGE); then their message.reparsed events sent, with `notify`.
    Returns what it did; `last_id` 0 when there was nothing left."""
    result = Reparsed()
    deliveries: list[int] = []
    with session_scope() as session:
        messages = list(
            session.scalars(
                select(Message)
                .where(Message.id > after, *_stored(account_id))
                .order_by(Message.id)
                .limit(limit or PAGE)
                .options(selectinload(Message.attachments))
            )
        )
        if not messages:
            return result
        result.last_id = messages[-1].id
        readable: list[tuple[Message, bytes]] = []
        for message in messages:
            try:
                raw = storage.get_object(str(message.storage_backend), str(message.storage_key))
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:500]
                log.warning("reparse: message %s could not be read: %s", message.id, reason)
                result.unreadable.append(Unreadable(message.id, reason))
                continue
            readable.append((message, raw))
        outcomes = parsing.parse_all([raw for _, raw in readable])
        for (message, _), outcome in zip(readable, outcomes, strict=True):
            result.reparsed += 1
            changed = _apply(message, outcome, result)
            if changed:
                result.changed += 1
                if notify and message.processed_at is not None:
                    deliveries += webhooks.create_update_deliveries(session, message)
        session.flush()
    result.notified = len(deliveries)
    webhooks.dispatch(deliveries)
    return result


def _apply(message: Message, outcome: parsing.Outcome, result: Reparsed) -> bool:
    """Set the parsed fields the new parse gives; True when any changed."""
    if isinstance(outcome, str):
        # Unparseable with this parser: the fields an earlier one found are kept.
        return _set(message, {"parse_error": outcome})
    changed = _set(message, {**parsed_fields(outcome), "parse_error": None})
    if not _same_bytes(message.attachments, outcome.attachments):
        result.attachments_kept += 1
        return changed
    for stored, parsed in zip(message.attachments, outcome.attachments, strict=True):
        changed |= _set(stored, {name: getattr(parsed, name) for name in ATTACHMENT_FIELDS})
    return changed


def _set(row: Message | Attachment, values: dict[str, Any]) -> bool:
    changed = False
    for name, value in values.items():
        if getattr(row, name) != value:
            setattr(row, name, value)
            changed = True
    return changed


def _same_bytes(stored: Sequence[Attachment], parsed: Sequence[ParsedAttachment]) -> bool:
    return len(stored) == len(parsed) and all(
        row.content_hash == hashlib.sha256(part.data).hexdigest()
        for row, part in zip(stored, parsed, strict=True)
    )


def enqueue(account_id: int | None, *, notify: bool) -> None:
    """After the request (in local mode it runs now, in this process)."""
    dispatch.enqueue(REPARSE_TASK, account_id, 0, notify)


def run(account_id: int | None, after: int, notify: bool) -> dict[str, Any]:
    """The task: up to TASK_PAGES pages above `after`, then itself again for the rest.
    Unreadable messages are logged (and listed in the task's result)."""
    done = Reparsed()
    for _ in range(TASK_PAGES):
        page = reparse_page(account_id, after, notify=notify)
        if not page.last_id:
            break
        done.add(page)
        after = page.last_id
    else:
        dispatch.enqueue(REPARSE_TASK, account_id, after, notify)
    log.info(
        "reparse of %s up to message %d: %s",
        f"account {account_id}" if account_id is not None else "every account",
        after,
        {key: value for key, value in done.as_dict().items() if key != "unreadable"}
        | {"unreadable": len(done.unreadable)},
    )
    return done.as_dict()


dispatch.register(REPARSE_TASK, run)
