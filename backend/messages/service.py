"""Messages: what was ingested, and the stored bytes behind it. Reads only."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import chain

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from backend import paging
from backend.errors import NotFound, ServiceUnavailable
from backend.models import Account, Attachment, Message
from backend.processing import quarantine
from backend.storage import service as storage
from backend.storage.base import ObjectNotFound

log = logging.getLogger(__name__)


def list_messages(
    session: Session,
    account_id: int,
    *,
    limit: int,
    offset: int = 0,
    after: int | None = None,
    quarantined: bool = False,
) -> paging.Page[Message]:
    """An account's messages, newest (most recently ingested) first; `quarantined`: only
    those set aside (backend/processing/quarantine.py)."""
    if session.get(Account, account_id) is None:
        raise NotFound(f"account {account_id} does not exist")
    if quarantined:
        return quarantine.list_quarantined(
            session, limit=limit, offset=offset, after=after, account_id=account_id
        )
    return paging.page(
        session,
        select(Message),
        Message.id,
        limit=limit,
        offset=offset,
        after=after,
        newest_first=True,
        within=(Message.account_id, account_id),
    )


def get_message(session: Session, message_id: int) -> Message:
    message = session.scalar(
        select(Message).where(Message.id == message_id).options(selectinload(Message.attachments))
    )
    if message is None:
        raise NotFound(f"message {message_id} does not exist")
    return message


def get_attachment(session: Session, message_id: int, attachment_id: int) -> Attachment:
    attachment = session.scalar(
        select(Attachment).where(
            Attachment.id == attachment_id, Attachment.message_id == message_id
        )
    )
    if attachment is None:
        raise NotFound(f"message {message_id} has no attachment {attachment_id}")
    return attachment


def raw_chunks(message: Message) -> Iterator[bytes]:
    """The message's stored bytes, exactly as the server sent them."""
    if message.storage_backend is None or message.storage_key is None:
        reason = message.skipped_reason or "it was not stored"
        raise NotFound(f"message {message.id} has no stored body: {reason}")
    return open_chunks(message.storage_backend, message.storage_key, f"message {message.id}")


def open_chunks(backend: str, key: str, what: str) -> Iterator[bytes]:
    """Start reading a stored object. The first chunk is read here, so a missing object
    or an unreachable store is an error response, not a stream cut off after its headers."""
    try:
        chunks = storage.iter_object(backend, key)
        first = next(chunks, b"")
    except ObjectNotFound as exc:
        raise NotFound(f"the stored bytes of {what} are missing from {backend} storage") from exc
    except Exception as exc:
        log.warning("reading %s from %s storage failed: %s", what, backend, type(exc).__name__)
        raise ServiceUnavailable(
            f"{backend} storage could not be read ({type(exc).__name__}); try again later"
        ) from exc
    return chain([first], chunks)
