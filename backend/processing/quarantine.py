"""Quarantined messages: those whose processing failed MAX_PROCESS_FAILURES times while
others went through (backend/processing/service.py), set aside with the reason while
the others flow. They are listed, and replayed after a fix: the failure count starts
again and the message is handed on through `hand_on`, as a new one is.

A replay delivers to each receiver at most once: processing creates a message's
`message.received` deliveries with ON CONFLICT DO NOTHING on their dedupe key, so a
receiver that had the message already is not sent it again, and only messages still
quarantined are taken (one UPDATE ... RETURNING), so two replays racing hand a message on
once.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend import paging
from backend.errors import Conflict, NotFound
from backend.models import Account, Message


def list_quarantined(
    session: Session,
    *,
    limit: int,
    offset: int = 0,
    after: int | None = None,
    account_id: int | None = None,
) -> paging.Page[Message]:
    """Quarantined messages (of every account, or one's), newest first, on their own
    partial index."""
    return paging.page(
        session,
        select(Message).where(Message.quarantined_at.is_not(None)),
        Message.id,
        limit=limit,
        offset=offset,
        after=after,
        newest_first=True,
        within=None if account_id is None else (Message.account_id, account_id),
    )


def count(session: Session) -> int:
    return session.scalar(select(func.count()).where(Message.quarantined_at.is_not(None))) or 0


def release(
    session: Session, *, message_id: int | None = None, account_id: int | None = None
) -> list[int]:
    """Take quarantined messages out of quarantine (one, an account's, or all) with their
    failure count at zero; returns their ids, for the caller to hand on
    (`service.hand_on`) after the commit. Only flushes. The last reason
    (`process_error`) is kept until the next attempt."""
    if account_id is not None and session.get(Account, account_id) is None:
        raise NotFound(f"account {account_id} does not exist")
    query = update(Message).where(
        Message.quarantined_at.is_not(None), Message.processed_at.is_(None)
    )
    if message_id is not None:
        query = query.where(Message.id == message_id)
    if account_id is not None:
        query = query.where(Message.account_id == account_id)
    ids = sorted(
        session.scalars(query.values(process_failures=0, quarantined_at=None).returning(Message.id))
    )
    if message_id is not None and not ids:
        message = session.get(Message, message_id)
        if message is None:
            raise NotFound(f"message {message_id} does not exist")
        if message.processed_at is not None:
            raise Conflict(f"message {message_id} is not quarantined: it was processed")
        raise Conflict(
            f"message {message_id} is not quarantined: it waits for processing "
            f"({message.process_failures} failures so far)"
        )
    return ids
