"""Change tracking (backend/mailbox/changes.py) against the real Dovecot fixture: flags,
deletions and moves, with CONDSTORE and QRESYNC on and off, each change reaching the
stored message and the receiver once; and against Cyrus (QRESYNC, OBJECTID)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.audit.service import audit_account
from backend.db import get_engine
from backend.mailbox import changes, imap, pool
from backend.mailbox.imap import MAX_UID
from backend.mailbox.service import PollResult, poll_account
from backend.models import (
    Account,
    DeliveryStatus,
    Message,
    PollOutcome,
    PollRun,
    WebhookDelivery,
)
from backend.storage import service as storage
from backend.storage.base import message_key
from backend.webhooks import service as webhooks
from tests.support.accounts import make_account
from tests.support.commits import after_each_commit
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot
from tests.support.imap_server import UIDVALIDITY, FakeImapServer, FakeMessage
from tests.support.mail import generated
from tests.support.receiver import Receiver
from tests.support.servers import RealServer, on_both_servers
from tests.support.wait import wait_for
from tests.support.webhooks import receiver, webhooks_on

__all__ = ["receiver", "webhooks_on"]  # fixtures

# Dovecot's own capabilities less CONDSTORE and QRESYNC (and ESEARCH: the plain SEARCH
# path of the UID set comparison).
WITHOUT_CONDSTORE = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE UIDPLUS MOVE NAMESPACE"


@pytest.fixture(scope="module")
def plain_dovecot() -> Iterator[Dovecot]:
    """A Dovecot that offers neither CONDSTORE nor QRESYNC nor ESEARCH."""
    server = Dovecot(
        Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-plain-")), capabilities=WITHOUT_CONDSTORE
    )
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(params=["condstore", "plain", "cyrus"])
def either_server(request: pytest.FixtureRequest) -> RealServer:
    """The Dovecot fixture (CONDSTORE, QRESYNC), then the one without them, then Cyrus
    (CONDSTORE, QRESYNC, and folders spelled `INBOX.Archive`)."""
    name = {"condstore": "dovecot", "plain": "plain_dovecot"}.get(request.param, "cyrus")
    server: RealServer = request.getfixturevalue(name)
    return server


@pytest.fixture
def tracked(db: Session, webhooks_on: Callable[..., None]) -> Callable[..., tuple[Account, str]]:
    """An account with INBOX and Archive on a server (a new user), webhooks on."""

    def make(server: RealServer, **columns: Any) -> tuple[Account, str]:
        username = f"user-{uuid.uuid4().hex[:10]}"
        server.add_user(username)
        archive = server.folder("Archive")
        server.create_folder(username, archive)
        account = make_account(db, server, username=username, folders=["INBOX", archive], **columns)
        return account, username

    return make


def poll(account: Account) -> PollResult:
    result = poll_account(account.id, force=True)
    assert result.outcome == PollOutcome.SUCCESS, result.error
    return result


def stored(db: Session, account_id: int) -> dict[int, Message]:
    db.expire_all()
    rows = db.scalars(select(Message).where(Message.account_id == account_id))
    return {message.id: message for message in rows}


def events(receiver: Receiver) -> list[dict[str, Any]]:
    return [request.json() for request in receiver.delivered()]


def _fetch_all(server: RealServer, username: str, folder: str = "INBOX") -> dict[int, Any]:
    with server.client(username) as client:
        client.select_folder(folder, readonly=True)
        found: dict[int, Any] = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
        client.logout()
    return found


def change_server(server: RealServer, username: str, *, moves: bool = True) -> None:
    """\\Seen on 10 messages, 5 expunged, 3 moved into Archive (INBOX UIDs 1-10, 11-15,
    16-18), as a mail client would."""
    with server.client(username) as client:
        client.select_folder("INBOX")
        client.add_flags(list(range(1, 11)), [b"\\Seen"])
        client.add_flags(list(range(11, 16)), [b"\\Deleted"])
        client.uid_expunge(list(range(11, 16)))
        if moves:
            client.move(list(range(16, 19)), server.folder("Archive"))
        client.logout()


def test_flags_deletions_and_moves_reach_the_messages_and_the_receiver_once(
    db: Session,
    either_server: RealServer,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    server = either_server
    archive = server.folder("Archive")
    condstore = server.capabilities is None
    account, username = tracked(server)
    server.append_many(username, [generated(index) for index in range(20)])
    server_raw = {uid: bytes(item[b"BODY[]"]) for uid, item in _fetch_all(server, username).items()}
    first = poll(account)
    assert len(first.new_message_ids) == 20
    before = stored(db, account.id)
    by_uid = {message.uid: message.id for message in before.values()}
    # Cyrus offers OBJECTID: each message has the server's EMAILID, which a move keeps.
    objectid = isinstance(server, Cyrus)
    email_ids = {message.id: message.email_id for message in before.values()}
    assert all((email_id is not None) == objectid for email_id in email_ids.values())
    assert receiver.delivered() == []  # a baseline reports nothing
    db.refresh(account)
    state = account.change_state or {}
    assert sorted(state) == sorted(["INBOX", archive])
    assert all((value["highestmodseq"] is not None) == condstore for value in state.values())

    change_server(server, username)
    second = poll(account)

    assert second.new_message_ids == []  # the moved copies are not new messages
    kinds = Counter(event["type"] for event in events(receiver))
    assert kinds == {"message.updated": 10, "message.deleted": 5, "message.moved": 3}
    after = stored(db, account.id)
    assert set(after) == set(before)  # one row per message, the same ids
    for uid in range(1, 11):
        assert after[by_uid[uid]].flags == ["\\Seen"]
        assert after[by_uid[uid]].deleted_at is None
    for uid in range(11, 16):
        assert after[by_uid[uid]].deleted_at is not None
        assert after[by_uid[uid]].folder == "INBOX"
    moved = [after[by_uid[uid]] for uid in range(16, 19)]
    assert {message.folder for message in moved} == {archive}
    assert all(message.deleted_at is None for message in moved)
    assert all(message.email_id == email_ids[message.id] for message in moved)
    for inbox_uid, message in zip(range(16, 19), moved, strict=True):
        # Its bytes where they were stored; the copy's gone with the copy.
        assert message.storage_backend is not None and message.storage_key is not None
        store = storage.backend(message.storage_backend)
        assert store.get(message.storage_key) == server_raw[inbox_uid]
        copy_key = message_key(account.id, archive, message.uidvalidity, message.uid)
        assert not store.exists(copy_key)
    db.refresh(account)
    assert account.message_count == 20

    updated = [event for event in events(receiver) if event["type"] == "message.updated"]
    assert {event["data"]["message"]["id"] for event in updated} == {
        by_uid[uid] for uid in range(1, 11)
    }
    assert all(event["data"]["previous_flags"] == [] for event in updated)
    assert all(event["data"]["message"]["flags"] == ["\\Seen"] for event in updated)
    moves = [event["data"] for event in events(receiver) if event["type"] == "message.moved"]
    assert {move["message"]["id"] for move in moves} == {by_uid[uid] for uid in range(16, 19)}
    assert {move["from"]["uid"] for move in moves} == {16, 17, 18}
    assert {move["to"]["folder"] for move in moves} == {archive}

    # Nothing changed since: nothing more is reported.
    poll(account)
    assert len(receiver.delivered()) == 18
    assert len(set(receiver.event_ids())) == 18

    # A flag cleared is a change too, with the flags it had.
    with server.client(username) as client:
        client.select_folder("INBOX")
        client.remove_flags([1], [b"\\Seen"])
        client.logout()
    poll(account)
    last = events(receiver)[-1]
    assert last["type"] == "message.updated"
    assert last["data"]["message"] == {
        **last["data"]["message"],
        "id": by_uid[1],
        "flags": [],
    }
    assert last["data"]["previous_flags"] == ["\\Seen"]
    assert stored(db, account.id)[by_uid[1]].flags == []


def test_a_flag_changed_during_a_first_sync_is_reported_by_the_next_poll(
    db: Session,
    either_server: RealServer,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under CONDSTORE a first sync takes no baseline of the flags (every message was
    stored by it, with the flags it fetched): a change made while it ran, after its
    message's flags were fetched, comes with the next poll's CHANGEDSINCE; the point
    it reached commits with the poll's last transaction, not in one of its own.
    Without CONDSTORE the baseline is fetched, and catches it at once."""
    server = either_server
    condstore = server.capabilities is None
    account, username = tracked(server)
    server.append_many(username, [generated(index) for index in range(6)])
    baselines: list[object] = []
    real_fetch_flags = imap.ImapSession.fetch_flags
    real_fetch_bodies = imap.ImapSession.fetch_bodies

    def fetch_flags(session: imap.ImapSession, *args: Any, **kwargs: Any) -> Any:
        baselines.append(args)
        return real_fetch_flags(session, *args, **kwargs)

    def fetch_bodies(session: imap.ImapSession, *args: Any, **kwargs: Any) -> Any:
        # A mail client marks message 2 read once its flags were fetched.
        with server.client(username) as client:
            client.select_folder("INBOX")
            client.add_flags([2], [b"\\Seen"])
            client.logout()
        return real_fetch_bodies(session, *args, **kwargs)

    # At each commit: whether the tracking state is there, and the poll still running.
    commits: list[tuple[bool, bool]] = []

    def look(_session: Session) -> None:
        with get_engine().connect() as conn:
            state = conn.scalar(select(Account.change_state).where(Account.id == account.id))
            running = conn.scalar(
                select(PollRun.id).where(
                    PollRun.account_id == account.id, PollRun.outcome == PollOutcome.RUNNING
                )
            )
        commits.append((bool(state), running is not None))

    monkeypatch.setattr(imap.ImapSession, "fetch_flags", fetch_flags)
    monkeypatch.setattr(imap.ImapSession, "fetch_bodies", fetch_bodies)
    with after_each_commit(look):
        first = poll(account)
    monkeypatch.setattr(imap.ImapSession, "fetch_bodies", real_fetch_bodies)
    assert len(first.new_message_ids) == 6
    assert (baselines == []) == condstore
    # Under CONDSTORE the state first commits once the poll is over (with its end);
    # a baseline of flags commits it in the tracker's own transaction.
    running_when_recorded = next(running for recorded, running in commits if recorded)
    assert running_when_recorded is not condstore
    message = next(m for m in stored(db, account.id).values() if m.uid == 2)
    if condstore:
        assert message.flags == []  # as its flags were fetched
        assert receiver.delivered() == []
        poll(account)
    [event] = events(receiver)
    assert event["type"] == "message.updated"
    assert event["data"]["message"]["id"] == message.id
    assert event["data"]["message"]["flags"] == ["\\Seen"]
    assert stored(db, account.id)[message.id].flags == ["\\Seen"]


def test_a_poll_that_fails_before_recording_its_changes_loses_and_repeats_nothing(
    db: Session,
    dovecot: Dovecot,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account, username = tracked(dovecot)
    server_uids = dovecot.append_many(username, [generated(index) for index in range(20)])
    assert len(poll(account).new_message_ids) == len(server_uids)
    # (A move's copy is stored by the failed poll and handed on as new: see
    # docs/webhooks.md.)
    change_server(dovecot, username, moves=False)

    create = webhooks.create_change_deliveries

    def dies(*args: Any, **kwargs: Any) -> list[int]:
        raise RuntimeError("the worker died here")

    monkeypatch.setattr(webhooks, "create_change_deliveries", dies)
    failed = poll_account(account.id)
    assert failed.outcome == PollOutcome.INTERNAL_ERROR
    assert receiver.delivered() == []
    assert all(
        message.flags == [] and message.deleted_at is None
        for message in stored(db, account.id).values()
        if message.folder == "INBOX"
    )

    monkeypatch.setattr(webhooks, "create_change_deliveries", create)
    assert poll_account(account.id, force=True).outcome == PollOutcome.SUCCESS
    kinds = Counter(event["type"] for event in events(receiver))
    assert kinds == {"message.updated": 10, "message.deleted": 5}
    poll(account)
    assert len(receiver.delivered()) == 15


@on_both_servers
def test_a_renumbered_folder_is_matched_by_content_not_reported(
    db: Session,
    mail_server: RealServer,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    account, username = tracked(mail_server)
    mail_server.append_many(username, [generated(index) for index in range(5)])
    poll(account)
    mail_server.reset_uidvalidity(username)
    pool.clear()

    assert poll(account).new_message_ids == []
    poll(account)
    assert receiver.delivered() == []
    assert all(message.deleted_at is None for message in stored(db, account.id).values())


def _at_new_uids(
    db: Session, server: RealServer, username: str, account: Account, folder: str = "INBOX"
) -> None:
    """Each stored message of the folder is where the server has it now: its
    UIDVALIDITY and the UID whose bytes it holds."""
    current = server.folder_status(username, folder)[b"UIDVALIDITY"]
    on_server = {
        uid: hashlib.sha256(bytes(item[b"BODY[]"])).hexdigest()
        for uid, item in _fetch_all(server, username, folder).items()
    }
    inbox = [row for row in stored(db, account.id).values() if row.folder == folder]
    assert {row.uidvalidity for row in inbox} == {current}
    assert {row.uid: row.content_hash for row in inbox} == on_server


def _followed_at_new_uids(
    db: Session,
    server: RealServer,
    username: str,
    account: Account,
    receiver: Receiver,
    *,
    folder: str = "INBOX",
) -> None:
    """A flag change and an expunge at the stored messages' new UIDs are reported once,
    on the stored messages; nothing is stored or handed on again; the audit finds the
    folder whole."""
    by_uid = {row.uid: row.id for row in stored(db, account.id).values() if row.folder == folder}
    flagged, expunged = sorted(by_uid)[:2]
    with server.client(username) as client:
        client.select_folder(folder)
        client.add_flags([flagged], [b"\\Flagged"])
        client.add_flags([expunged], [b"\\Deleted"])
        client.uid_expunge([expunged])
        client.logout()
    assert poll(account).new_message_ids == []
    assert poll(account).new_message_ids == []

    changed = [event for event in events(receiver) if event["type"] != "message.received"]
    assert sorted((event["type"], event["data"]["message"]["id"]) for event in changed) == sorted(
        [("message.updated", by_uid[flagged]), ("message.deleted", by_uid[expunged])]
    )
    after = {row.id: row for row in stored(db, account.id).values() if row.folder == folder}
    assert len(after) == len(by_uid)
    assert after[by_uid[flagged]].flags == ["\\Flagged"]
    assert after[by_uid[expunged]].deleted_at is not None
    audit = audit_account(account.id)
    inbox = next(entry for entry in audit.folders if entry.folder == folder)
    assert (inbox.missing, inbox.objects_missing, inbox.repaired) == (0, 0, 0)
    assert inbox.objects_checked >= len(by_uid)


@on_both_servers
def test_a_renumbered_folders_messages_are_followed_at_their_new_uids(
    db: Session,
    mail_server: RealServer,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    """Dovecot renumbers with new UIDs (matched by content); Cyrus keeps them (matched
    by its EMAILID)."""
    account, username = tracked(mail_server)
    mail_server.append_many(username, [generated(index) for index in range(5)])
    assert len(poll(account).new_message_ids) == 5
    mail_server.reset_uidvalidity(username)
    pool.clear()

    assert poll(account).new_message_ids == []
    _at_new_uids(db, mail_server, username, account)
    _followed_at_new_uids(db, mail_server, username, account, receiver)
    assert Counter(event["type"] for event in events(receiver))["message.received"] == 0


def test_a_folder_recreated_on_cyrus_keeps_its_messages_at_their_new_uids(
    db: Session,
    cyrus: Cyrus,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    """DELETE, CREATE and APPEND of the same mail in the other order: a new UIDVALIDITY
    and new UIDs; Cyrus gives each message its EMAILID again (from its content)."""
    account, username = tracked(cyrus)
    archive = cyrus.folder("Archive")
    raws = [generated(index) for index in range(4)]
    cyrus.append_many(username, raws, archive)
    assert len(poll(account).new_message_ids) == 4
    pool.clear()
    cyrus.delete_folder(username, archive)
    cyrus.create_folder(username, archive)
    cyrus.append_many(username, list(reversed(raws)), archive)

    assert poll(account).new_message_ids == []
    _at_new_uids(db, cyrus, username, account, archive)
    _followed_at_new_uids(db, cyrus, username, account, receiver, folder=archive)


def test_with_tracking_off_nothing_is_read_or_reported(
    db: Session,
    dovecot: Dovecot,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    account, username = tracked(dovecot, track_changes=False)
    dovecot.append_many(username, [generated(index) for index in range(20)])
    poll(account)
    change_server(dovecot, username)

    second = poll(account)
    assert len(second.new_message_ids) == 3  # the moved messages, as new ones
    assert receiver.delivered() == []
    assert all(
        message.flags == [] and message.deleted_at is None
        for message in stored(db, account.id).values()
    )


def test_a_server_that_reports_every_uid_vanished_costs_ranges_not_numbers(
    db: Session, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    """A hostile QRESYNC server says 1:4294967295 vanished: the stored messages are
    marked deleted, and the range is never expanded into four billion numbers."""
    modseq = {"value": 10}
    capabilities = b"IMAP4rev1 ENABLE CONDSTORE QRESYNC"

    def respond(tag: bytes, command: bytes) -> bytes | None:
        upper = command.upper()
        if upper.startswith(b"CAPABILITY"):
            return b"* CAPABILITY " + capabilities + b"\r\n" + tag + b" OK done\r\n"
        if upper.startswith(b"ENABLE"):
            return b"* ENABLED QRESYNC\r\n" + tag + b" OK enabled\r\n"
        if upper.startswith(b"STATUS"):
            return (
                b"* STATUS INBOX (MESSAGES 2 UIDNEXT 3 UIDVALIDITY %d HIGHESTMODSEQ %d)\r\n"
                % (UIDVALIDITY, modseq["value"])
                + tag
                + b" OK status\r\n"
            )
        if b"CHANGEDSINCE" in upper:
            return b"* VANISHED (EARLIER) 1:4294967295\r\n" + tag + b" OK fetched\r\n"
        return None

    messages = [FakeMessage(uid, generated(uid)) for uid in (1, 2)]
    with FakeImapServer(messages, respond=respond) as server:
        account = make_account(
            db, imap_host="127.0.0.1", imap_port=server.port, imap_security="none"
        )
        assert len(poll(account).new_message_ids) == 2
        modseq["value"] = 11
        poll(account)
        assert any(b"CHANGEDSINCE 10 VANISHED" in command for command in server.commands)

    assert all(message.deleted_at is not None for message in stored(db, account.id).values())
    assert Counter(event["type"] for event in events(receiver)) == {"message.deleted": 2}


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        (b"1:3,7", [(1, 3), (7, 7)]),
        (b"(EARLIER) 5:2,3:9,11", [(2, 9), (11, 11)]),
        (b"1:4294967295", [(1, MAX_UID)]),
        (b"0:*,4294967296,x:2,9", [(9, 9)]),
    ],
)
def test_sequence_sets_become_merged_ranges_never_numbers(
    text: bytes, ranges: list[tuple[int, int]]
) -> None:
    assert imap._sequence_set(text.split(b" ")[-1]) == ranges


@pytest.mark.parametrize(
    ("data", "email_id"),
    [
        ({b"EMAILID": (b"M6d99ac3275bb4e",)}, "M6d99ac3275bb4e"),
        ({b"X-GM-MSGID": 1278455344230334865}, "1278455344230334865"),
        ({b"FLAGS": ()}, None),
    ],
)
def test_the_servers_identity_of_a_message_is_read_from_emailid_or_x_gm_msgid(
    data: dict[bytes, Any], email_id: str | None
) -> None:
    assert imap._email_id(data) == email_id


def test_a_change_event_is_retried_dead_lettered_and_replayed_like_any_event(
    db: Session,
    dovecot: Dovecot,
    tracked: Callable[..., tuple[Account, str]],
    receiver: Receiver,
) -> None:
    account, username = tracked(dovecot)
    dovecot.append(username, generated(1))
    poll(account)
    receiver.fail(times=4)  # WEBHOOK_MAX_ATTEMPTS
    with dovecot.client(username) as client:
        client.select_folder("INBOX")
        client.add_flags([1], [b"\\Flagged"])
        client.logout()
    poll(account)

    def dead() -> list[WebhookDelivery]:
        db.expire_all()
        return list(
            db.scalars(select(WebhookDelivery).where(WebhookDelivery.status == DeliveryStatus.DEAD))
        )

    [letter] = wait_for(dead, "the dead letter")
    assert (letter.event_type, letter.attempts) == ("message.updated", 4)
    tried = {request.json()["id"] for request in receiver.requests}
    assert tried == {letter.event_id}

    ids = webhooks.replay_dead_letters(db, delivery_id=letter.id)
    db.commit()
    webhooks.dispatch(ids)
    [delivered] = events(receiver)
    assert delivered["id"] == letter.event_id
    assert delivered["data"]["message"]["flags"] == ["\\Flagged"]


def test_a_move_is_matched_by_the_servers_identity_before_content() -> None:
    """Pure matching logic: EMAILID / X-GM-MSGID decides when both sides have one (the
    same message re-encoded by a server still matches; identical content with another
    identity does not); content hash and Message-ID decide otherwise."""

    def row(folder: str, content: str, email_id: str | None) -> SimpleNamespace:
        return SimpleNamespace(
            folder=folder,
            uidvalidity=1,
            content_hash=content,
            message_id="<m@example.org>",
            email_id=email_id,
        )

    gone = row("INBOX", "hash-a", "M1")
    other_identity = row("Archive", "hash-a", "M2")
    same_identity = row("Archive", "hash-b", "M1")
    copies = [other_identity, same_identity]
    assert changes._pop_match(copies, gone) is same_identity
    assert copies == [other_identity]

    plain = row("INBOX", "hash-a", None)
    assert changes._pop_match([row("INBOX", "hash-a", None)], plain) is None  # same folder
    assert changes._pop_match([row("Archive", "hash-b", None)], plain) is None
    found = row("Archive", "hash-a", None)
    assert changes._pop_match([found], plain) is found
