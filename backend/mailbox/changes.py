"""Change tracking: flags, deletions and moves on the server, after a message was stored.

A poll reads each folder's changes as it goes (`Tracker.track`, with the folder
selected) and records them all at its end (`Tracker.finish`) in one transaction: the
messages' new flags, `deleted_at`, new locations, the webhook deliveries of their
events and where tracking stands in each folder (`Account.change_state`). A poll that dies
before that commit recorded nothing, and the next one reads the same changes again
from the same point; one that dies after it has recorded everything (its deliveries
are sent by the sweep). Flags are compared with the stored ones, so reading a change
twice never reports it twice.

How changes are read, best first:
- CONDSTORE: STATUS HIGHESTMODSEQ (asked with UIDVALIDITY and UIDNEXT, no round trip
  more) unchanged means nothing changed, and the poller skips the folder; otherwise
  `UID FETCH 1:* (FLAGS) (CHANGEDSINCE <modseq>)`.
- QRESYNC: the same FETCH with VANISHED also names the UIDs expunged since.
- Without them: the newest CHANGES_WINDOW messages' flags every poll; every
  CHANGES_FULL_CHECK_SECONDS all flags and the folder's UID set (as ranges with
  ESEARCH) compared with the stored one; sooner when STATUS's counts show an expunge
  (fewer messages than before plus what arrived).

A message gone from one folder and new in another in the same poll is a move, matched
by the server's identity (OBJECTID EMAILID, X-GM-MSGID) or else by content hash and
Message-ID: the stored message takes the new location, the copy just stored is dropped
before it is handed on, and `message.moved` replaces `message.received` and
`message.deleted`. A message with a server identity is not even stored again: the
poller hands its new place over (`seen_elsewhere`), and the stored message takes it.
Gmail's labels (X-GM-LABELS) are read with the flags under CONDSTORE: a change of
labels is a `message.updated` too. A folder renumbered (UIDVALIDITY changed) starts
again from a baseline: the poller has moved its stored messages to their new UIDs
(matched by server identity, or by content), whose flags are then compared once, and
from then on they are followed there.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from backend.config import get_settings
from backend.db import session_scope
from backend.mailbox.imap import FolderStatus, ImapSession, UidRanges
from backend.models import Account, Attachment, EventType, Message, utcnow
from backend.storage import service as storage
from backend.webhooks import events
from backend.webhooks import service as webhooks

log = logging.getLogger(__name__)

# Stored rows looked up with at most this many UIDs in one IN list; more, and the
# folder's rows are read in one statement.
LOOKUP_CHUNK = 1000
# The columns a change needs of a stored message (never its bodies).
_COLUMNS = (
    Message.id,
    Message.folder,
    Message.uidvalidity,
    Message.uid,
    Message.flags,
    Message.message_id,
    Message.content_hash,
    Message.email_id,
    Message.labels,
    Message.storage_backend,
    Message.storage_key,
)
# What a flag change needs.
_FLAG_COLUMNS = (
    Message.id,
    Message.folder,
    Message.uidvalidity,
    Message.uid,
    Message.flags,
    Message.message_id,
    Message.labels,
)


@dataclass(frozen=True)
class _Known:
    """Where tracking stood in a folder as the poll started: the HIGHESTMODSEQ every
    change up to which is recorded (CONDSTORE), what STATUS said then (so a poll can
    tell an expunge from the counts) and the last full check."""

    uidvalidity: int
    highestmodseq: int | None
    uidnext: int
    messages: int
    full_check_at: datetime | None

    @classmethod
    def of(cls, value: dict[str, Any]) -> _Known:
        checked = value.get("full_check_at")
        return cls(
            uidvalidity=int(value["uidvalidity"]),
            highestmodseq=value.get("highestmodseq"),
            uidnext=int(value["uidnext"]),
            messages=int(value["messages"]),
            full_check_at=datetime.fromisoformat(checked) if checked else None,
        )


@dataclass
class _Read:
    """What a poll read of one folder, recorded by `finish`."""

    folder: str
    uidvalidity: int
    status: FolderStatus
    full_check_at: datetime | None
    flags: dict[int, list[str]] = field(default_factory=dict)
    labels: dict[int, list[str]] = field(default_factory=dict)  # Gmail's, with CONDSTORE
    vanished: UidRanges = field(default_factory=list)
    # The server's whole UID set, when it was compared this poll.
    present: UidRanges | None = None


class Tracker:
    """The change tracking of one poll of one account."""

    def __init__(self, account: Account, *, enabled: bool = True) -> None:
        """Read from the account row as the poll loaded it: no statement more."""
        self.account = account
        self.enabled = enabled and account.track_changes
        self.state = dict(account.change_state or {}) if self.enabled else {}
        self.known = {folder: _Known.of(value) for folder, value in self.state.items()}
        self.read: list[_Read] = []
        # Messages the poller did not store again: their server identity is held.
        self.elsewhere: list[_Seen] = []
        # The state, left by `finish` for the poll's last transaction (`unwritten`).
        self.unwritten_state = False

    def seen_elsewhere(self, folder: str, uidvalidity: int, item: Any) -> None:
        """A message in `folder` whose server identity a stored message holds: the same
        message, in two folders (Gmail's labels) or moved (the stored one then gone)."""
        if self.enabled:
            self.elsewhere.append(
                _Seen(folder, uidvalidity, item.uid, item.flags, item.email_id, item.labels)
            )

    def unchanged(self, mailbox: ImapSession, folder: str, status: FolderStatus) -> bool:
        """Whether nothing can have changed in the folder since it was last tracked: only
        CONDSTORE can say so (an unchanged HIGHESTMODSEQ). Without it every poll looks at
        the newest messages' flags. A folder that will be looked into gets the session
        ready first (QRESYNC must be enabled before a SELECT)."""
        if not self.enabled:
            return True
        known = self.known.get(folder)
        if (
            known is not None
            and status.highestmodseq is not None
            and (known.uidvalidity, known.highestmodseq)
            == (status.uidvalidity, status.highestmodseq)
        ):
            return True
        if status.highestmodseq is not None:
            mailbox.enable_qresync()
        return False

    def track(
        self,
        mailbox: ImapSession,
        folder: str,
        status: FolderStatus,
        uidvalidity: int,
        *,
        held_before: bool = True,
    ) -> None:
        """Read the changes of the selected folder since it was last tracked. `status`:
        its STATUS before the poll fetched anything (the point recorded as reached).
        `held_before`: whether any message of the folder was stored before this poll."""
        if not self.enabled or uidvalidity != status.uidvalidity:
            return  # renumbered between STATUS and SELECT: the next poll starts afresh
        settings = get_settings()
        now = utcnow()
        known = self.known.get(folder)
        if known is None or known.uidvalidity != uidvalidity:
            # A baseline. A folder tracked for the first time may hold messages stored
            # long ago, and a renumbered one the messages the poller has just moved to
            # their new UIDs with the flags they had: their flags are compared once.
            read = _Read(folder, uidvalidity, status, full_check_at=now)
            if held_before or status.highestmodseq is None:
                read.flags = mailbox.fetch_flags()
            # Else a first sync under CONDSTORE: this poll stored every message with the
            # flags it fetched, and what changed since `status` comes with the next
            # poll's CHANGEDSINCE (a first sync of 5,000 spent a tenth of its time here).
            self.read.append(read)
            return
        full_due = known.full_check_at is None or now - known.full_check_at >= timedelta(
            seconds=settings.changes_full_check_seconds
        )
        read = _Read(folder, uidvalidity, status, full_check_at=known.full_check_at)
        if status.highestmodseq is not None and known.highestmodseq is not None:
            if status.highestmodseq != known.highestmodseq:
                changes = mailbox.fetch_changes(known.highestmodseq)
                read.flags, read.vanished = changes.flags, changes.vanished
                read.labels = changes.labels
            if not mailbox.qresync and (full_due or _expunged(known, status)):
                read.present = mailbox.uid_set()
                read.full_check_at = now
        elif full_due:
            read.flags = mailbox.fetch_flags()
            read.present = mailbox.uid_set()
            read.full_check_at = now
        else:
            read.flags = mailbox.fetch_flags(settings.changes_window, exists=status.messages)
            if _expunged(known, status):
                read.present = mailbox.uid_set()
        self.read.append(read)

    def finish(
        self, new_ids: list[int], *, fenced: Callable[[Session], None] | None = None
    ) -> list[int]:
        """Record everything read, in one transaction, and send the events; returns the
        poll's new message ids without the copies that turned out to be moves. `fenced`:
        the poll's check that it still holds the mailbox, first in that transaction.
        Baselines alone need no transaction: their state is left to the poll's last
        (`unwritten`)."""
        if not self.read:
            return new_ids
        if not any(r.flags or r.labels or r.vanished or r.present is not None for r in self.read):
            # Baselines only (a first sync under CONDSTORE): nothing to compare, nothing
            # to send; the state goes with the poll's last transaction.
            for read in self.read:
                self.state[read.folder] = _state(read)
            self.read, self.unwritten_state = [], True
            return new_ids
        with session_scope() as session:
            if fenced is not None:
                fenced(session)
            recorded = _Recording(session, self.account, new_ids, self.elsewhere)
            for read in self.read:
                recorded.folder(read)
            recorded.settle()
            for read in self.read:
                self.state[read.folder] = _state(read)
            session.execute(
                update(Account).where(Account.id == self.account.id).values(change_state=self.state)
            )
            delivery_ids = webhooks.create_change_deliveries(session, self.account, recorded.events)
        webhooks.dispatch(delivery_ids)
        for backend, key in recorded.dropped_objects:
            try:
                storage.delete_object(backend, key)
            except Exception as exc:  # an orphan object costs space, not correctness
                log.warning("account %s: moved copy's %s stays: %s", self.account.id, key, exc)
        if recorded.events:
            log.info(
                "account %s: %d changes recorded (%d moves)",
                self.account.id,
                len(recorded.events),
                len(recorded.moved_copies),
            )
        return [message_id for message_id in new_ids if message_id not in recorded.moved_copies]

    def unwritten(self) -> dict[str, Any]:
        """The account's values for the poll's last transaction: the state `finish`
        left to it."""
        if not self.unwritten_state:
            return {}
        self.unwritten_state = False
        return {"change_state": self.state}


class _Recording:
    """The work of `Tracker.finish`, on its session."""

    def __init__(
        self,
        session: Session,
        account: Account,
        new_ids: Sequence[int],
        elsewhere: Sequence[_Seen] = (),
    ) -> None:
        self.session = session
        self.account = account
        self.new_ids = set(new_ids)
        self.elsewhere = list(elsewhere)
        self.now = utcnow()
        self.events: list[tuple[EventType, dict[str, Any]]] = []
        self.gone: list[Any] = []
        self.moved_copies: set[int] = set()
        self.dropped_objects: list[tuple[str, str]] = []

    def folder(self, read: _Read) -> None:
        """Flag changes of one folder recorded; what is gone from it collected. A large
        folder's rows are read as UIDs first: only the gone ones are read whole."""
        gone_uids: set[int] = set()
        if read.vanished or read.present is not None:
            held = self.session.scalars(select(Message.uid).where(*self._live(read))).all()
            for uid in held:
                if _within(read.vanished, uid) or (
                    read.present is not None and not _within(read.present, uid)
                ):
                    gone_uids.add(uid)
            self.gone += self._rows(read, _COLUMNS, sorted(gone_uids))
        uids = sorted(uid for uid in {*read.flags, *read.labels} if uid not in gone_uids)
        updates = []
        for row in self._rows(read, _FLAG_COLUMNS, uids):
            flags = read.flags.get(row.uid, row.flags or [])
            labels = read.labels.get(row.uid, row.labels)
            relabelled = labels is not None and sorted(labels) != sorted(row.labels or [])
            if sorted(flags) == sorted(row.flags or []) and not relabelled:
                continue
            updates.append({"id": row.id, "flags": flags, "labels": labels})
            details: dict[str, Any] = {"flags": flags, "previous_flags": row.flags or []}
            if relabelled:
                details |= {"labels": labels, "previous_labels": row.labels or []}
            self.events.append((EventType.MESSAGE_UPDATED, self._data(row, **details)))
        if updates:
            self.session.execute(update(Message), updates)

    def settle(self) -> None:
        """The gone messages: a move where a copy came in elsewhere, else a deletion."""
        copies = self._copies()
        drop: list[int] = []
        moves: list[dict[str, Any]] = []
        deleted: list[int] = []
        for row in self.gone:
            copy = _pop_match(copies, row)
            if copy is None:
                deleted.append(row.id)
                self.events.append(
                    (
                        EventType.MESSAGE_DELETED,
                        self._data(row, deleted_at=self.now.isoformat()),
                    )
                )
                continue
            if copy.id is not None:  # a copy stored by this poll, not a _Seen
                drop.append(copy.id)
                self.moved_copies.add(copy.id)
                if (
                    copy.storage_backend
                    and copy.storage_key
                    and copy.storage_key != row.storage_key
                ):
                    self.dropped_objects.append((copy.storage_backend, copy.storage_key))
            moves.append(
                {
                    "id": row.id,
                    "folder": copy.folder,
                    "uidvalidity": copy.uidvalidity,
                    "uid": copy.uid,
                    "flags": copy.flags,
                    "email_id": copy.email_id or row.email_id,
                    "labels": row.labels if copy.labels is None else copy.labels,
                }
            )
            moved_from = {"folder": row.folder, "uidvalidity": row.uidvalidity, "uid": row.uid}
            moved_to = {"folder": copy.folder, "uidvalidity": copy.uidvalidity, "uid": copy.uid}
            self.events.append(
                (
                    EventType.MESSAGE_MOVED,
                    self._data(
                        copy,
                        id=row.id,
                        message_id=row.message_id,
                        moved_from=moved_from,
                        moved_to=moved_to,
                    ),
                )
            )
        if drop:
            self.dropped_objects += [
                (backend, key)
                for backend, key in self.session.execute(
                    select(Attachment.storage_backend, Attachment.storage_key).where(
                        Attachment.message_id.in_(drop)
                    )
                )
                # Not those kept only inside the raw message: they have no object.
                if backend is not None and key is not None
            ]
            # The copies first: the moved messages take their place in the unique key.
            self.session.execute(delete(Message).where(Message.id.in_(drop)))
            self.session.execute(
                update(Account)
                .where(Account.id == self.account.id)
                .values(message_count=Account.message_count - len(drop))
            )
        if moves:
            self.session.execute(update(Message), moves)
        if deleted:
            self.session.execute(
                update(Message).where(Message.id.in_(deleted)).values(deleted_at=self.now)
            )

    def _copies(self) -> list[Any]:
        """This poll's new messages, the candidates for the far end of a move."""
        if not self.gone:
            return []
        ids = sorted(self.new_ids)
        found: list[Any] = list(self.elsewhere)
        for start in range(0, len(ids), LOOKUP_CHUNK):
            found += self.session.execute(
                select(*_COLUMNS).where(Message.id.in_(ids[start : start + LOOKUP_CHUNK]))
            ).all()
        return found

    def _live(self, read: _Read) -> tuple[Any, ...]:
        """The folder's stored messages not deleted, under the UIDVALIDITY read."""
        return (
            Message.account_id == self.account.id,
            Message.folder == read.folder,
            Message.uidvalidity == read.uidvalidity,
            Message.deleted_at.is_(None),
        )

    def _rows(self, read: _Read, columns: Sequence[Any], uids: Sequence[int]) -> list[Any]:
        """These columns of the folder's live messages with these UIDs: by IN lists, or
        the whole folder in one statement when the UIDs are many (a full check)."""
        if not uids:
            return []
        if len(uids) > LOOKUP_CHUNK:
            wanted = set(uids)
            rows = self.session.execute(select(*columns).where(*self._live(read))).all()
            return [row for row in rows if row.uid in wanted]
        found = self.session.execute(
            select(*columns).where(*self._live(read), Message.uid.in_(list(uids)))
        )
        return list(found.all())

    def _data(self, row: Any, **details: Any) -> dict[str, Any]:
        message = {
            "id": details.pop("id", row.id),
            "folder": row.folder,
            "uidvalidity": row.uidvalidity,
            "uid": row.uid,
            "message_id": details.pop("message_id", row.message_id),
            "flags": details.pop("flags", row.flags or []),
            "labels": details.pop("labels", row.labels),
        }
        if "moved_from" in details:
            details["from"] = details.pop("moved_from")
            details["to"] = details.pop("moved_to")
        return events.change_data(self.account, message, **details)


@dataclass(frozen=True)
class _Seen:
    """A message the poller found in a folder and did not store: its server identity is
    a stored message's. A copy for `settle` with no row of its own."""

    folder: str
    uidvalidity: int
    uid: int
    flags: list[str]
    email_id: str
    labels: list[str] | None
    id: None = None
    message_id: None = None
    content_hash: None = None
    storage_backend: None = None
    storage_key: None = None


def _pop_match(copies: list[Any], gone: Any) -> Any | None:
    """The copy of a gone message that came in elsewhere: the same server identity when
    both have one, else the same content hash and Message-ID. Taken from `copies`."""
    for index, copy in enumerate(copies):
        if (copy.folder, copy.uidvalidity) == (gone.folder, gone.uidvalidity):
            continue
        if copy.email_id and gone.email_id:
            same = copy.email_id == gone.email_id
        else:
            same = gone.content_hash is not None and (copy.content_hash, copy.message_id) == (
                gone.content_hash,
                gone.message_id,
            )
        if same:
            return copies.pop(index)
    return None


def _state(read: _Read) -> dict[str, Any]:
    return {
        "uidvalidity": read.uidvalidity,
        "highestmodseq": read.status.highestmodseq,
        "uidnext": read.status.uidnext,
        "messages": read.status.messages,
        "full_check_at": read.full_check_at.isoformat() if read.full_check_at else None,
    }


def _expunged(known: _Known, status: FolderStatus) -> bool:
    """Whether STATUS's counts show an expunge since: fewer messages than before plus
    what can have arrived (UIDNEXT's growth bounds that)."""
    return status.messages < known.messages + max(0, status.uidnext - known.uidnext)


def _within(ranges: UidRanges, uid: int) -> bool:
    index = bisect.bisect_right(ranges, (uid, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= uid <= ranges[index][1]
