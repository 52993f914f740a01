"""One message in several folders: Gmail's labels (X-GM-EXT-1) and RFC 8474's OBJECTID.

Dovecot 2.3 offers neither, so a proxy in front of it (tests/support/imap_proxy.py) plays
the server: it adds the capability, marks a folder `\\All` in LIST, and answers the
identity items (X-GM-MSGID, X-GM-THRID, X-GM-LABELS; EMAILID, THREADID) from a test
header each message carries, so a message and its copies in other folders (APPEND to
each, or MOVE) have one identity, as on those servers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from imapclient import imap_utf7
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.audit.service import audit_account
from backend.db import bulk_insert
from backend.mailbox import folders
from backend.mailbox.folders import Listed, resolve
from backend.mailbox.service import MESSAGES, PollResult, poll_account
from backend.models import Message, PollOutcome, utcnow
from backend.processing.service import after_poll
from tests.support.accounts import make_account
from tests.support.api import auth_headers
from tests.support.dovecot import Dovecot
from tests.support.imap_proxy import ImapProxy
from tests.support.mail import generated
from tests.support.receiver import Receiver
from tests.support.webhooks import receiver, webhooks_on

__all__ = ["receiver", "webhooks_on"]  # fixtures

ALL_MAIL = "All Mail"
# A label that is a folder name with characters beyond ASCII: modified UTF-7 on the wire.
RECUS = "Reçus"
_IDS = re.compile(rb' ?BODY\[HEADER\.FIELDS \("?X-TEST-IDS"?\)\] \{(\d+)\}\r\n', re.IGNORECASE)
_ASKED = re.compile(rb" (X-GM-MSGID|X-GM-THRID|X-GM-LABELS|EMAILID|THREADID)\b", re.IGNORECASE)
_FETCH = re.compile(rb"^\* \d+ FETCH ")
_FOLDER_ASKED = re.compile(rb'^(?:STATUS|EXAMINE|SELECT) ("[^"]*"|\S+)', re.IGNORECASE)


class IdentityServer:
    """What the proxy adds to Dovecot: Gmail's extension (`gmail`) or OBJECTID."""

    def __init__(self, *, gmail: bool) -> None:
        self.gmail = gmail
        self.capability = b"X-GM-EXT-1" if gmail else b"OBJECTID"
        # Labels by X-GM-MSGID in place of the header's: a label changed later.
        self.labels: dict[str, bytes] = {}

    def up(self, state: dict[str, object], line: bytes) -> bytes:
        """FETCH of identity items: the test header instead, which Dovecot has."""
        if b"FETCH" not in line.upper() or not _ASKED.search(line):
            return line
        items = _ASKED.sub(b"", line)
        return items.replace(b"(", b"(BODY.PEEK[HEADER.FIELDS (X-TEST-IDS)] ", 1)

    def down(self, state: dict[str, object], response: bytes) -> bytes:
        if _FETCH.match(response):
            return self._identities(response)
        if b"CAPABILITY " in response:
            return re.sub(rb"(CAPABILITY [^\]\r\n]*)", rb"\1 " + self.capability, response)
        if response.startswith(b"* LIST (") and response.rstrip().endswith(b' "All Mail"'):
            return response.replace(b"* LIST (", b"* LIST (\\All ", 1)
        return response

    def _identities(self, response: bytes) -> bytes:
        found = _IDS.search(response)
        if found is None:
            return response
        end = found.end() + int(found.group(1))
        header = response[found.end() : end]
        value = header.partition(b":")[2].strip()
        said = b""
        if value:
            email_id, thread_id, *rest = value.split(b" ", 2)
            labels = rest[0] if rest else b""
            if self.gmail:
                labels = self.labels.get(email_id.decode(), labels)
                said = b" X-GM-MSGID %s X-GM-THRID %s X-GM-LABELS (%s)" % (
                    email_id,
                    thread_id,
                    labels,
                )
            else:
                said = b" EMAILID (M%s) THREADID (T%s)" % (email_id, thread_id)
        return response[: found.start()] + said + response[end:]


def message(number: int, labels: list[str], *, thread: int = 7) -> bytes:
    """A generated message with the identity the fake server reads from it."""
    quoted = b" ".join(
        b'"\\\\%s"' % label[1:].encode() if label.startswith("\\") else imap_utf7.encode(label)
        for label in labels
    )
    header = b"X-Test-Ids: %d %d %s\r\n" % (1000 + number, thread, quoted)
    return header + generated(number)


@pytest.fixture(params=["gmail", "objectid"])
def server(request: pytest.FixtureRequest) -> IdentityServer:
    return IdentityServer(gmail=request.param == "gmail")


def handed_on(account_id: int) -> PollResult:
    result = poll_account(account_id, force=True)
    assert result.outcome == PollOutcome.SUCCESS, result.error
    after_poll(account_id, result.new_message_ids, result.account_event)
    return result


def rows(db: Session, account_id: int) -> list[Message]:
    db.expire_all()
    found = db.scalars(select(Message).where(Message.account_id == account_id).order_by(Message.id))
    return list(found)


def received(receiver: Receiver) -> list[dict[str, Any]]:
    return [
        request.json()["data"]["message"]
        for request in receiver.delivered()
        if request.json()["type"] == "message.received"
    ]


def test_one_message_in_two_folders_is_stored_and_handed_on_once_with_its_labels(
    db: Session,
    dovecot: Dovecot,
    server: IdentityServer,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    """INBOX and a label polled (All Mail not chosen): the message in both is one."""
    with ImapProxy(dovecot.host, dovecot.imap_port, up=server.up, down=server.down) as proxy:
        account = make_account(db, dovecot, folders=["INBOX", RECUS], imap_port=proxy.port)
        both = message(1, ["\\Inbox", RECUS, "\\Important"], thread=70)
        dovecot.append_many(account.username, [both, message(2, ["\\Inbox"])])
        dovecot.append_many(account.username, [both, message(3, [RECUS])], RECUS)

        first = handed_on(account.id)
        assert first.messages == 3
        again = handed_on(account.id)
        # The copy left in the label's folder is not missing either (nor stored by it).
        audit = audit_account(account.id)

    assert again.messages == 0
    assert [(folder.folder, folder.missing) for folder in audit.folders] == [
        ("INBOX", 0),
        (RECUS, 0),
    ]
    stored = rows(db, account.id)
    assert [(row.folder, row.uid) for row in stored] == [("INBOX", 1), ("INBOX", 2), (RECUS, 2)]
    assert [row.email_id for row in stored] == (
        ["1001", "1002", "1003"] if server.gmail else ["M1001", "M1002", "M1003"]
    )
    assert stored[0].thread_id == ("70" if server.gmail else "T70")
    if server.gmail:
        assert stored[0].labels == ["\\Inbox", RECUS, "\\Important"]
    else:
        assert all(row.labels is None for row in stored)
    # The copy's body was never fetched: one BODY.PEEK[] per folder, for the new UIDs.
    bodies = [command for command in proxy.commands if b"BODY.PEEK[]" in command]
    assert [command.split(b" ")[2] for command in bodies] == [b"1:2", b"2"]

    events = received(receiver)
    assert Counter(event["id"] for event in events) == {row.id: 1 for row in stored}
    first_event = next(event for event in events if event["id"] == stored[0].id)
    assert first_event["email_id"] == stored[0].email_id
    assert first_event["labels"] == (stored[0].labels if server.gmail else None)


def test_with_all_mail_chosen_gmail_is_polled_in_all_mail_alone(
    db: Session, dovecot: Dovecot, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    gmail = IdentityServer(gmail=True)
    folders.clear()
    with ImapProxy(dovecot.host, dovecot.imap_port, up=gmail.up, down=gmail.down) as proxy:
        account = make_account(db, dovecot, folders=["INBOX", "*"], imap_port=proxy.port)
        username = account.username
        inbox, work = message(1, ["\\Inbox", "Work"]), message(2, ["Work"])
        dovecot.append_many(username, [inbox])
        dovecot.append_many(username, [inbox, work], "Work")
        dovecot.append_many(username, [inbox, work, message(3, [])], ALL_MAIL)
        dovecot.append_many(username, [message(4, ["\\Junk"])], "Junk")
        assert handed_on(account.id).messages == 3

    stored = rows(db, account.id)
    assert {row.folder for row in stored} == {ALL_MAIL}
    assert [row.labels for row in stored] == [["\\Inbox", "Work"], ["Work"], []]
    selected = {
        found.group(1).strip(b'"')
        for command in proxy.commands
        if (found := _FOLDER_ASKED.match(command)) is not None
    }
    assert selected == {ALL_MAIL.encode()}  # INBOX and Work were not even asked
    assert len(received(receiver)) == 3


def test_gmail_folders_resolve_to_all_mail_with_spam_and_trash_only_when_named() -> None:
    listing = [
        Listed("INBOX", frozenset()),
        Listed("Work", frozenset()),
        Listed("[Gmail]/All Mail", frozenset({"\\all"})),
        Listed("[Gmail]/Spam", frozenset({"\\junk"})),
        Listed("[Gmail]/Trash", frozenset({"\\trash"})),
    ]
    everything = ["INBOX", "Work", "[Gmail]/All Mail"]
    assert resolve(["*"], listing) == everything
    assert resolve(["*"], listing, gmail=True) == ["[Gmail]/All Mail"]
    assert resolve(["INBOX", "\\All", "\\Junk"], listing, gmail=True) == [
        "[Gmail]/All Mail",
        "[Gmail]/Spam",
    ]
    # No All Mail chosen: the folders as chosen (copies are matched by X-GM-MSGID).
    assert resolve(["INBOX", "Work"], listing, gmail=True) == ["INBOX", "Work"]


def test_a_move_between_polled_folders_is_a_move_not_a_new_message(
    db: Session,
    dovecot: Dovecot,
    server: IdentityServer,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
) -> None:
    with ImapProxy(dovecot.host, dovecot.imap_port, up=server.up, down=server.down) as proxy:
        account = make_account(db, dovecot, folders=["INBOX", "Archive"], imap_port=proxy.port)
        username = account.username
        dovecot.create_folder(username, "Archive")
        dovecot.append_many(username, [message(1, ["\\Inbox"]), message(2, ["\\Inbox"])])
        assert handed_on(account.id).messages == 2
        with dovecot.client(username) as client:
            client.select_folder("INBOX")
            client.move([1], "Archive")
            client.logout()
        moved = handed_on(account.id)

    assert moved.messages == 0
    stored = rows(db, account.id)
    assert [(row.folder, row.uid, row.deleted_at) for row in stored] == [
        ("Archive", 1, None),
        ("INBOX", 2, None),
    ]
    types = Counter(request.json()["type"] for request in receiver.delivered())
    assert types == {"message.received": 2, "message.moved": 1}


@pytest.mark.parametrize("track_changes", [True, False])
def test_a_message_gone_and_back_between_polls_is_followed_at_its_new_uid(
    db: Session,
    dovecot: Dovecot,
    server: IdentityServer,
    receiver: Receiver,
    *,
    webhooks_on: Callable[..., None],
    track_changes: bool,
) -> None:
    """Moved to a folder not polled and back: the stored message (its identity held) is
    now at its new UID, not marked deleted nor left at the old one; a flag change and an
    expunge there are followed (with tracking)."""
    with ImapProxy(dovecot.host, dovecot.imap_port, up=server.up, down=server.down) as proxy:
        account = make_account(
            db, dovecot, folders=["INBOX"], imap_port=proxy.port, track_changes=track_changes
        )
        username = account.username
        dovecot.create_folder(username, "Elsewhere")
        dovecot.append_many(username, [message(1, ["\\Inbox"]), message(2, ["\\Inbox"])])
        assert handed_on(account.id).messages == 2
        first = rows(db, account.id)[0].id
        with dovecot.client(username) as client:
            client.select_folder("INBOX")
            client.move([1], "Elsewhere")
            client.select_folder("Elsewhere")
            client.move([1], "INBOX")
            client.logout()
        assert handed_on(account.id).messages == 0
        back = rows(db, account.id)[0]
        assert (back.id, back.uid, back.deleted_at) == (first, 3, None)
        audit = audit_account(account.id)
        assert [(entry.missing, entry.objects_missing) for entry in audit.folders] == [(0, 0)]
        if track_changes:
            with dovecot.client(username) as client:
                client.select_folder("INBOX")
                client.add_flags([3], [b"\\Flagged"])
                client.logout()
            assert handed_on(account.id).messages == 0
            with dovecot.client(username) as client:
                client.select_folder("INBOX")
                client.add_flags([3], [b"\\Deleted"])
                client.uid_expunge([3])
                client.logout()
            assert handed_on(account.id).messages == 0

    stored = rows(db, account.id)
    assert len(stored) == 2
    types = [
        (request.json()["type"], request.json()["data"]["message"]["id"])
        for request in receiver.delivered()
    ]
    assert Counter(kind for kind, _id in types) == {"message.received": 2} | (
        {"message.updated": 1, "message.deleted": 1} if track_changes else {}
    )
    assert all(message_id == first for kind, message_id in types if kind != "message.received")
    assert (stored[0].deleted_at is not None) == track_changes


def test_a_second_copy_in_one_folder_leaves_the_stored_message_where_it_is(
    db: Session, dovecot: Dovecot, server: IdentityServer
) -> None:
    """The same identity at a second UID of the folder while the first is still there:
    one message, stored at its first UID, and not moved."""
    with ImapProxy(dovecot.host, dovecot.imap_port, up=server.up, down=server.down) as proxy:
        account = make_account(db, dovecot, folders=["INBOX"], imap_port=proxy.port)
        dovecot.append(account.username, message(1, ["\\Inbox"]))
        assert handed_on(account.id).messages == 1
        dovecot.append(account.username, message(1, ["\\Inbox"]))
        assert handed_on(account.id).messages == 0

    assert [(row.uid, row.deleted_at) for row in rows(db, account.id)] == [(1, None)]


def test_a_label_changed_later_is_a_message_update(
    db: Session,
    dovecot: Dovecot,
    receiver: Receiver,
    webhooks_on: Callable[..., None],
    api: TestClient,
) -> None:
    gmail = IdentityServer(gmail=True)
    with ImapProxy(dovecot.host, dovecot.imap_port, up=gmail.up, down=gmail.down) as proxy:
        account = make_account(db, dovecot, folders=["INBOX"], imap_port=proxy.port)
        username = account.username
        dovecot.append_many(username, [message(1, ["\\Inbox"])])
        handed_on(account.id)
        gmail.labels["1001"] = b'"\\\\Inbox" ' + imap_utf7.encode(RECUS)
        # Gmail raises the message's MODSEQ with its labels; Dovecot with a flag set and
        # cleared again (so only the labels differ).
        with dovecot.client(username) as client:
            client.select_folder("INBOX")
            client.add_flags([1], [b"$Touched"])
            client.remove_flags([1], [b"$Touched"])
            client.logout()
        handed_on(account.id)

    (stored,) = rows(db, account.id)
    assert stored.labels == ["\\Inbox", RECUS]
    read = api.get(f"/messages/{stored.id}", headers=auth_headers()).json()
    assert (read["email_id"], read["thread_id"], read["labels"]) == ("1001", "7", stored.labels)
    (update,) = [
        request.json()["data"]
        for request in receiver.delivered()
        if request.json()["type"] == "message.updated"
    ]
    assert update["message"]["labels"] == ["\\Inbox", RECUS]
    assert update["previous_labels"] == ["\\Inbox"]


def test_a_second_live_message_with_one_server_identity_is_never_inserted(
    db: Session, dovecot: Dovecot
) -> None:
    """A backfill or an audit storing the copy while a poll stores the original: the
    database keeps one (ON CONFLICT DO NOTHING on the unique index)."""
    account = make_account(db, dovecot)
    row = {
        "account_id": account.id,
        "uidvalidity": 1,
        "email_id": "1001",
        "size": 1,
        "flags": [],
        "to_addrs": [],
        "cc_addrs": [],
        "process_failures": 0,
        "ingested_at": utcnow(),
    }

    def insert(folder: str) -> int:
        new = {**row, "folder": folder, "uid": 1}
        return len(bulk_insert(db, MESSAGES, [new], any_conflict=True, returning=("id",)))

    assert (insert("INBOX"), insert("Work")) == (1, 0)
    db.execute(update(Message).where(Message.account_id == account.id).values(deleted_at=utcnow()))
    assert insert("Work") == 1  # a deleted message's identity is free again
    db.rollback()
