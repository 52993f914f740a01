"""Where a folder's ingestion stands: its cursor (the last UID stored under one
UIDVALIDITY), the UIDNEXT its last complete poll saw, and what it held under an earlier
UIDVALIDITY.

The cursor only moves forward, and only in the transaction that stores the rows it
covers (backend/mailbox/service.py explains why that gives exactly-once). Every function
runs on the caller's session and never commits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import ColumnElement, Table, bindparam, exists, func, select, update
from sqlalchemy.orm import Session

from backend.db import insert_for
from backend.mailbox.imap import MAX_UID
from backend.models import Account, FolderCursor, Message, utcnow

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another poll has taken the mailbox since this one did (its fencing token is newer):
    this poll must not write (backend/mailbox/lock.py)."""


def take_fence(session: Session, account_id: int) -> int:
    """The next fencing token of the account's polls, for a poll that has just taken the
    mailbox's lease: from now on only this poll's batches commit."""
    fence = session.scalar(
        update(Account)
        .where(Account.id == account_id)
        .values(poll_fence=Account.poll_fence + 1)
        .returning(Account.poll_fence)
    )
    assert fence is not None  # the caller has just read the account
    return int(fence)


def hold_fence(session: Session, account_id: int, fence: int) -> None:
    """Raise LeaseLost unless `fence` is still the account's newest token; the account
    row stays locked until the caller's transaction ends, so no newer poll can take the
    mailbox between this check and the commit."""
    newest = session.scalar(
        select(Account.poll_fence).where(Account.id == account_id).with_for_update()
    )
    if newest != fence:
        raise LeaseLost(f"mailbox {account_id} was taken by a newer poll ({newest} > {fence})")


def resume_after(
    session: Session, account_id: int, folder: str, uidvalidity: int, uidnext: int | None = None
) -> int | None:
    """The last UID stored under this UIDVALIDITY, or None when the folder is new or
    was renumbered (then the cursor is reset, and the folder is scanned again). `uidnext`:
    the folder's UIDNEXT as it was selected, kept as the new generation's `match_below`."""
    row = session.scalar(
        select(FolderCursor).where(
            FolderCursor.account_id == account_id, FolderCursor.folder == folder
        )
    )
    if row is not None and row.uidvalidity == uidvalidity:
        return row.last_uid
    if row is None:
        session.execute(
            insert_for(session, FolderCursor)
            .values(
                account_id=account_id,
                folder=folder,
                uidvalidity=uidvalidity,
                last_uid=0,
                match_below=uidnext,
                updated_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["account_id", "folder"])
        )
    else:
        log.warning(
            "account %s folder %r: UIDVALIDITY %s -> %s, scanning it again",
            account_id,
            folder,
            row.uidvalidity,
            uidvalidity,
        )
        row.uidvalidity = uidvalidity
        row.last_uid = 0
        row.match_below = uidnext
        row.updated_at = utcnow()
    return None


def advance(session: Session, account_id: int, folder: str, uidvalidity: int, uid: int) -> None:
    # Never backwards (a concurrent poll may be ahead); never under another UIDVALIDITY.
    session.execute(
        update(FolderCursor)
        .where(
            FolderCursor.account_id == account_id,
            FolderCursor.folder == folder,
            FolderCursor.uidvalidity == uidvalidity,
        )
        .values(last_uid=_greatest(session, FolderCursor.last_uid, uid), updated_at=utcnow())
    )


def seen_uidnext(session: Session, account_id: int) -> dict[str, tuple[int, int]]:
    """(UIDVALIDITY, UIDNEXT) by folder, as the last complete poll of each saw them."""
    rows = session.execute(
        select(FolderCursor.folder, FolderCursor.uidvalidity, FolderCursor.uidnext).where(
            FolderCursor.account_id == account_id
        )
    )
    return {folder: (uidvalidity, uidnext) for folder, uidvalidity, uidnext in rows if uidnext}


def saw_uidnext(
    session: Session, account_id: int, folder: str, uidvalidity: int, uidnext: int
) -> None:
    """Every message below `uidnext` (as STATUS stated it before the poll searched the
    folder) has been stored or deliberately left out: a later poll that finds the same
    UIDVALIDITY and UIDNEXT has nothing to look for. UIDNEXT only grows, even when a
    message is appended and expunged between polls, so an equal one means no arrival."""
    session.execute(
        update(FolderCursor)
        .where(
            FolderCursor.account_id == account_id,
            FolderCursor.folder == folder,
            FolderCursor.uidvalidity == uidvalidity,
        )
        .values(uidnext=uidnext)
    )


def oldest_held(session: Session, account_id: int, folder: str) -> datetime | None:
    """The INTERNALDATE of the oldest message held from this folder (any UIDVALIDITY)."""
    return session.scalar(
        select(func.min(Message.internal_date)).where(
            Message.account_id == account_id, Message.folder == folder
        )
    )


class Held(NamedTuple):
    """What is held from a folder, as a poll of one of its generations begins."""

    any: bool  # a message, under any UIDVALIDITY
    # The UID below which this generation's new messages are matched by content hash
    # with those held under another UIDVALIDITY (so a renumbered folder is not stored
    # twice): the folder's UIDNEXT when this UIDVALIDITY was first seen. 0 when nothing
    # is held from another generation; everything (MAX_UID + 1) when the bound is unknown.
    match_below: int


def held(session: Session, account_id: int, folder: str, uidvalidity: int) -> Held:
    """What is held from the folder (`Held`): one statement, two when another generation
    is held."""
    in_folder = (Message.account_id == account_id, Message.folder == folder)
    any_held, other = session.execute(
        select(
            exists().where(*in_folder),
            exists().where(*in_folder, Message.uidvalidity != uidvalidity),
        )
    ).one()
    if not other:
        return Held(any=bool(any_held), match_below=0)
    bound = session.scalar(
        select(FolderCursor.match_below).where(
            FolderCursor.account_id == account_id,
            FolderCursor.folder == folder,
            FolderCursor.uidvalidity == uidvalidity,
        )
    )
    return Held(any=True, match_below=MAX_UID + 1 if bound is None else int(bound))


class Holder(NamedTuple):
    """A stored message that holds a server identity or a content hash, and where."""

    id: int
    folder: str
    uidvalidity: int
    uid: int
    content_hash: str | None
    live: bool


_HOLDER = (
    Message.id,
    Message.folder,
    Message.uidvalidity,
    Message.uid,
    Message.content_hash,
    Message.deleted_at.is_(None),
)


def held_hashes(
    session: Session, account_id: int, folder: str, uidvalidity: int, hashes: set[str]
) -> list[Holder]:
    """The messages held from this folder under another UIDVALIDITY with one of these
    content hashes, oldest location first."""
    if not hashes:
        return []
    rows = session.execute(
        select(*_HOLDER)
        .where(
            Message.account_id == account_id,
            Message.folder == folder,
            Message.uidvalidity != uidvalidity,
            Message.content_hash.in_(hashes),
        )
        .order_by(Message.uidvalidity, Message.uid)
    )
    return [Holder(*row) for row in rows]


def held_email_ids(session: Session, account_id: int, email_ids: set[str]) -> dict[str, Holder]:
    """The live messages of the account that hold these server identities (EMAILID,
    X-GM-MSGID), by identity: the same message met in a second folder (not to be stored
    again), or in its own folder at another place (renumbered, or gone and back)."""
    if not email_ids:
        return {}
    rows = session.execute(
        select(Message.email_id, *_HOLDER).where(
            Message.account_id == account_id,
            Message.email_id.in_(email_ids),
            Message.deleted_at.is_(None),
        )
    )
    return {str(row[0]): Holder(*row[1:]) for row in rows}


def relocate(session: Session, account_id: int, moves: Sequence[tuple[Holder, int, int]]) -> None:
    """Move stored messages to their new (UIDVALIDITY, UID) in their folder. A poll,
    a backfill and an audit may relocate at once (only polls are fenced): the account
    row is locked first (a poll's batch holds it already), and a message moves only
    from the place it was found at and only to a place no row holds, so one that
    another relocated first, or whose place another took, stays as that one left it."""
    if not moves:
        return
    session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
    table = cast(Table, Message.__table__)
    there = table.alias("there")
    session.execute(
        update(table)
        .where(
            table.c.id == bindparam("held_id"),
            table.c.uidvalidity == bindparam("old_uidvalidity"),
            table.c.uid == bindparam("old_uid"),
            table.c.deleted_at.is_(None),
            ~exists().where(
                there.c.account_id == table.c.account_id,
                there.c.folder == table.c.folder,
                there.c.uidvalidity == bindparam("new_uidvalidity"),
                there.c.uid == bindparam("new_uid"),
            ),
        )
        .values(uidvalidity=bindparam("new_uidvalidity"), uid=bindparam("new_uid")),
        [
            {
                "held_id": held.id,
                "old_uidvalidity": held.uidvalidity,
                "old_uid": held.uid,
                "new_uidvalidity": uidvalidity,
                "new_uid": uid,
            }
            for held, uidvalidity, uid in moves
        ],
    )


def held_uids(
    session: Session, account_id: int, folder: str, uidvalidity: int, uids: Sequence[int]
) -> set[int]:
    """Which of these UIDs have a row already (stored, or skipped with a reason): a
    retried poll does not fetch them again, nor a body the server sent too large."""
    if not uids:
        return set()
    return set(
        session.scalars(
            select(Message.uid).where(
                Message.account_id == account_id,
                Message.folder == folder,
                Message.uidvalidity == uidvalidity,
                Message.uid.in_(list(uids)),
            )
        )
    )


def _greatest(session: Session, column: Any, value: int) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        return func.greatest(column, value)
    return func.max(column, value)  # SQLite's two-argument max() is scalar
