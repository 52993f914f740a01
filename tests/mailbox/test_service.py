"""poll_account against the real Dovecot fixture."""

from __future__ import annotations

import gc
import hashlib
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, event, func, select, update
from sqlalchemy.orm import Session

from backend import crypto
from backend.accounts.state import clear_backoff
from backend.db import bulk_insert, get_engine
from backend.mailbox import cursors, parsing
from backend.mailbox.service import MESSAGES, PollResult, poll_account
from backend.models import (
    Account,
    Attachment,
    FolderCursor,
    Message,
    PollRun,
    StorageBackend,
    utcnow,
)
from backend.storage import service as storage
from tests.support.accounts import MailAccount
from tests.support.api import auth_headers
from tests.support.commits import after_each_commit
from tests.support.dovecot import Dovecot
from tests.support.fsync import fsync_spy
from tests.support.mail import corpus, generated
from tests.support.s3 import Outage
from tests.support.servers import RealServer, on_both_servers


def server_bodies(server: RealServer, username: str, folder: str = "INBOX") -> dict[int, bytes]:
    """Every message in a folder as the server hands it out, by UID."""
    with server.client(username) as client:
        client.select_folder(folder, readonly=True)
        data = client.fetch(client.search("ALL"), ["BODY.PEEK[]"])
        client.logout()
    return {uid: bytes(item[b"BODY[]"]) for uid, item in data.items()}


def messages(db: Session, account_id: int) -> list[Message]:
    db.expire_all()
    return list(
        db.scalars(select(Message).where(Message.account_id == account_id).order_by(Message.uid))
    )


def nested_multipart(depth: int) -> bytes:
    """A message nested deeper than any parser's recursion allows."""
    raw = b"Subject: deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for level in range(depth):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (level, level + 1)
    return raw + b"--b%d\r\nContent-Type: text/plain\r\n\r\nhi\r\n" % depth


@on_both_servers
def test_corpus_and_generated_mail_ingested_once_and_byte_identical(
    db: Session, mail_server: RealServer, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    taken = [raw for raw in corpus() if mail_server.takes(raw)]  # Cyrus refuses two
    raws = [
        *taken,
        generated(1, attachment=b"%PDF-1.4 fake"),
        generated(2, message_id=False),
        nested_multipart(1500),
    ]
    mail_server.append_many(username, raws)
    account = mail_account()

    result = poll_account(account.id, task_id="task-1")

    assert result.outcome == "success"
    assert result.error is None
    assert result.messages == len(raws)
    held = messages(db, account.id)
    assert [m.id for m in held] == sorted(result.new_message_ids)
    on_server = server_bodies(mail_server, username)
    assert sorted(m.uid for m in held) == sorted(on_server)
    for message in held:
        assert message.storage_backend == "local"
        assert message.storage_key is not None
        raw = storage.get_object(message.storage_backend, message.storage_key)
        assert raw == on_server[message.uid]
        assert message.size == len(raw)
    assert result.bytes == sum(len(body) for body in on_server.values())

    # Real mailboxes repeat Message-IDs; each copy is its own message.
    shared = "<15090.61304.110929.45684@aaa.zzz.org>"
    assert sum(m.message_id == shared for m in held) == 5

    by_uid = {m.uid: m for m in held}
    first_generated = by_uid[len(taken) + 1]
    assert first_generated.subject == "Grüße Nr. 1 — 東京"
    assert first_generated.from_addr == "Zoë Ünïcode <zoe@example.org>"
    assert first_generated.to_addrs == ["Ingest <ingest@example.org>", "other@example.org"]
    assert first_generated.date == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert first_generated.text_body is not None and "schöne Grüße" in first_generated.text_body
    assert first_generated.html_body is not None and "<p>Hallo 1</p>" in first_generated.html_body
    assert first_generated.parse_error is None
    (attachment,) = db.scalars(
        select(Attachment).where(Attachment.message_id == first_generated.id)
    ).all()
    assert attachment.filename == "../../etc/Bericht ä.pdf"
    assert attachment.safe_name == "Bericht ä.pdf"
    # Small: kept only inside the raw message (ATTACHMENT_INLINE_MAX_BYTES).
    assert (attachment.storage_backend, attachment.storage_key) == (None, None)
    assert attachment.content_hash == hashlib.sha256(b"%PDF-1.4 fake").hexdigest()
    assert attachment.size == len(b"%PDF-1.4 fake")
    assert by_uid[len(taken) + 2].message_id is None

    # The parser chokes on this one: stored raw and flagged, and it stopped nothing.
    deep = by_uid[len(raws)]
    assert deep.parse_error is not None and "RecursionError" in deep.parse_error
    assert deep.storage_key is not None

    db.refresh(account)
    assert account.message_count == len(raws)
    assert account.status == "active"
    assert account.last_success_at is not None
    cursor = db.scalars(select(FolderCursor).where(FolderCursor.account_id == account.id)).one()
    assert cursor.last_uid == max(on_server)
    run = db.scalars(select(PollRun).where(PollRun.account_id == account.id)).one()
    assert (run.outcome, run.messages_count, run.bytes_count, run.task_id) == (
        "success",
        len(raws),
        result.bytes,
        "task-1",
    )
    assert run.duration_seconds is not None


@on_both_servers
def test_new_mail_between_polls_is_picked_up_and_nothing_is_stored_twice(
    db: Session, mail_server: RealServer, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    mail_server.append_many(username, [generated(i) for i in range(3)])
    account = mail_account()
    assert poll_account(account.id).messages == 3

    # `UID 4:*` matches the newest message even when nothing is new.
    nothing = poll_account(account.id)
    assert (nothing.outcome, nothing.messages, nothing.new_message_ids) == ("success", 0, [])

    mail_server.append_many(username, [generated(i) for i in range(3, 5)])
    second = poll_account(account.id)
    assert second.messages == 2
    held = messages(db, account.id)
    assert [m.uid for m in held] == [1, 2, 3, 4, 5]
    assert sorted(second.new_message_ids) == [m.id for m in held[3:]]
    db.refresh(account)
    assert account.message_count == 5


def test_a_first_sync_looks_up_no_held_uids_and_a_later_poll_does(
    dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    """Nothing is held from a folder its first sync begins on: the lookup of UIDs held
    already (a query and a transaction per 1,000 UIDs) is left out. A later poll, which
    may be a retry of one that stored part of a batch, still makes it."""
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(3)])
    account = mail_account()
    lookups: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if " ".join(statement.split()).startswith("SELECT messages.uid FROM messages "):
            lookups.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        assert poll_account(account.id).messages == 3
        assert lookups == []
        dovecot.append_many(username, [generated(i) for i in range(3, 5)])
        assert poll_account(account.id).messages == 2
        assert len(lookups) == 1
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)


def test_a_first_sync_that_a_backfill_overtakes_stores_nothing_twice(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing was held as the folder's first sync began, so it looks up no held UIDs;
    a backfill that stores some of them just after (rows, no cursor) is not undone or
    doubled: the insert keeps each message once, and the count stays true."""
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(3)])
    account = mail_account()
    assert poll_account(account.id).messages == 3
    # What a backfill leaves: the rows, and no cursor (it never moves one).
    db.execute(delete(FolderCursor).where(FolderCursor.account_id == account.id))
    db.commit()
    # It committed just after the first sync found nothing held.
    monkeypatch.setattr(cursors, "held", lambda *_args: cursors.Held(any=False, match_below=0))
    dovecot.append_many(username, [generated(3)])

    result = poll_account(account.id)

    assert (result.outcome, result.messages) == ("success", 1)
    assert [m.uid for m in messages(db, account.id)] == [1, 2, 3, 4]
    db.refresh(account)
    assert account.message_count == 4


def test_batches_commit_the_cursor_with_their_rows(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    """What another connection sees after each commit of the poll: batch by batch, each
    batch's rows, its cursor, the account's message count and the sync's progress move
    together (a poll killed between two commits resumes exactly after the last committed
    batch)."""
    set_env(IMAP_FETCH_BATCH_SIZE=3)
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(8)])
    account = mail_account()
    engine = get_engine()
    seen: list[tuple[int, int | None, int, int | None]] = []

    def look(_session: Session) -> None:
        with engine.connect() as conn:
            held = conn.scalar(
                select(func.count(Message.id)).where(Message.account_id == account.id)
            )
            cursor = conn.scalar(
                select(FolderCursor.last_uid).where(FolderCursor.account_id == account.id)
            )
            count, progress = conn.execute(
                select(Account.message_count, Account.sync_progress).where(Account.id == account.id)
            ).one()
        done = (progress or {}).get("INBOX", {}).get("done")
        state = (int(held or 0), cursor, count, done)
        if not seen or seen[-1] != state:
            seen.append(state)

    with after_each_commit(look):
        result = poll_account(account.id)

    assert result.messages == 8
    committed = [state for state in seen if state[0] or state[1]]
    assert committed == [(3, 3, 3, 3), (6, 6, 6, 6), (8, 8, 8, 8)], seen
    db.refresh(account)
    assert account.sync_progress == {"INBOX": {"done": 8, "total": 8}}


def test_a_syncs_start_commits_with_its_first_batch_or_with_the_polls_end(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    """A folder's sync has no transaction to announce its start: its total commits with
    its first batch, and a sync that stores nothing (an empty folder's first) commits it
    with the poll's last transaction."""
    set_env(IMAP_FETCH_BATCH_SIZE=3)
    username, _ = mail_user
    account = mail_account()
    assert poll_account(account.id).outcome == "success"
    db.refresh(account)
    assert account.sync_progress == {"INBOX": {"done": 0, "total": 0}}

    dovecot.append_many(username, [generated(i) for i in range(5)])
    engine = get_engine()
    seen: list[dict[str, int]] = []

    def look(_session: Session) -> None:
        with engine.connect() as conn:
            progress = conn.scalar(select(Account.sync_progress).where(Account.id == account.id))
        inbox = (progress or {})["INBOX"]
        if not seen or seen[-1] != inbox:
            seen.append(inbox)

    with after_each_commit(look):
        assert poll_account(account.id).messages == 5
    assert seen == [
        {"done": 0, "total": 0},
        {"done": 3, "total": 5},
        {"done": 5, "total": 5},
    ]


def test_objects_are_durable_before_their_rows_commit_each_fsynced_once(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each object's data is fsynced once, under its temporary name before it is renamed
    into place, and its directory after: at every commit, each object a committed row
    names has both behind it."""
    # Attachments of 5 to 40 bytes: those of 20 or fewer stay inside the raw message.
    set_env(IMAP_FETCH_BATCH_SIZE=3, ATTACHMENT_INLINE_MAX_BYTES=20)
    username, _ = mail_user
    dovecot.append_many(username, [generated(i, attachment=b"%PDF-" * i) for i in range(1, 9)])
    account = mail_account()
    root = storage.local_storage().root
    synced = fsync_spy(monkeypatch)
    engine = get_engine()
    not_durable: list[str] = []

    def look(_session: Session) -> None:
        with engine.connect() as conn:
            keys = list(
                conn.scalars(select(Message.storage_key).where(Message.account_id == account.id))
            ) + list(conn.scalars(select(Attachment.storage_key)))
        data = {inode for _path, inode in synced}
        directories = {path for path, _inode in synced}
        not_durable.extend(
            key
            for key in keys
            if key
            and ((root / key).stat().st_ino not in data or (root / key).parent not in directories)
        )

    with after_each_commit(look):
        result = poll_account(account.id)

    assert result.messages == 8
    assert not_durable == []
    files = [(path, inode) for path, inode in synced if path.name.startswith(".tmp-")]
    assert len(files) == 12  # 8 messages, the 4 attachments of more than 20 bytes
    assert len({inode for _path, inode in files}) == 12
    assert not any(path.is_file() for path, _inode in synced)  # none after its rename


def test_each_row_names_the_backend_its_object_went_to(
    db: Session,
    dovecot: Dovecot,
    mail_account: MailAccount,
    s3_outage: Outage,
    set_env: Callable[..., None],
) -> None:
    """A batch's rows are inserted while its objects are being written, naming S3; those
    whose objects fell back to local files (S3 down) say so by the commit: each row,
    message or attachment, names where its object is."""
    set_env(
        ATTACHMENT_INLINE_MAX_BYTES=20,  # each attachment below is an object of its own
        S3_MAX_ATTEMPTS=1,
        S3_CONNECT_TIMEOUT=1,
        S3_WRITE_TIMEOUT_SECONDS=1,
    )
    account = mail_account()
    username = account.username

    def stored(uids: range) -> list[tuple[StorageBackend | None, str | None]]:
        rows = [m for m in messages(db, account.id) if m.uid in uids]
        assert [m.uid for m in rows] == list(uids)
        return [(m.storage_backend, m.storage_key) for m in rows] + [
            (a.storage_backend, a.storage_key) for m in rows for a in m.attachments
        ]

    dovecot.append_many(username, [generated(i, attachment=b"%PDF-" * 8) for i in range(1, 4)])
    assert poll_account(account.id).messages == 3
    in_s3 = stored(range(1, 4))
    assert len(in_s3) == 6 and {backend for backend, _key in in_s3} == {"s3"}
    bucket = s3_outage.server.client()
    for _backend, key in in_s3:
        assert key is not None and bucket.head_object(Bucket=s3_outage.bucket, Key=key)

    s3_outage.begin()
    dovecot.append_many(username, [generated(i, attachment=b"%PDF-" * 8) for i in range(4, 7)])
    assert poll_account(account.id).messages == 3
    fell_back = stored(range(4, 7))
    assert len(fell_back) == 6 and {backend for backend, _key in fell_back} == {"local"}
    for _backend, key in fell_back:
        assert key is not None and storage.local_storage().exists(key)


def test_two_concurrent_polls_store_each_message_once(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(IMAP_FETCH_BATCH_SIZE=2)
    username, _ = mail_user
    raws = [generated(i, attachment=b"x" * i) for i in range(1, 21)]
    dovecot.append_many(username, raws)
    account = mail_account()
    results: list[PollResult] = []
    barrier = threading.Barrier(2)

    def poll() -> None:
        barrier.wait()
        results.append(poll_account(account.id))

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [r.outcome for r in results] == ["success", "success"]
    handed_on = results[0].new_message_ids + results[1].new_message_ids
    held = messages(db, account.id)
    assert sorted(handed_on) == [m.id for m in held]  # each new message handed on once
    assert [m.uid for m in held] == list(range(1, 21))
    assert db.scalar(select(func.count()).select_from(Attachment)) == 20
    db.refresh(account)
    assert account.message_count == 20


@on_both_servers
def test_uidvalidity_reset_stores_nothing_twice_and_loses_nothing(
    db: Session, mail_server: RealServer, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    # Two messages with the same Message-ID but different content, and one without any.
    twins = [generated(1), generated(1).replace(b"Hallo 1,", b"Hello 1,")]
    mail_server.append_many(username, [*twins, generated(2, message_id=False)])
    account = mail_account()
    assert poll_account(account.id).messages == 3
    old_validity = mail_server.folder_status(username)[b"UIDVALIDITY"]

    mail_server.reset_uidvalidity(username)
    mail_server.append(username, generated(3))
    result = poll_account(account.id)

    assert result.outcome == "success"
    assert result.messages == 1
    held = messages(db, account.id)
    assert len(held) == 4
    # The three held from before moved to their new UIDs, each one to its own.
    new_validity = mail_server.folder_status(username)[b"UIDVALIDITY"]
    assert new_validity != old_validity
    assert {m.uidvalidity for m in held} == {new_validity}
    assert len({m.uid for m in held}) == 4
    (new,) = [m for m in held if m.message_id == "<gen-3@example.org>"]
    assert sorted(result.new_message_ids) == [new.id]
    cursor = db.scalars(select(FolderCursor).where(FolderCursor.account_id == account.id)).one()
    assert cursor.uidvalidity == new_validity
    assert cursor.last_uid == new.uid
    # And the next poll finds nothing new.
    assert poll_account(account.id).messages == 0


def test_a_copy_arriving_after_a_uidvalidity_change_is_stored(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    """Content matching covers what the folder held at the change: a byte-identical
    message that arrives later (moved out and back, sent again) is new mail."""
    username, _ = mail_user
    raw = generated(1)
    dovecot.append(username, raw)
    account = mail_account()
    assert poll_account(account.id).messages == 1
    dovecot.reset_uidvalidity(username)
    assert poll_account(account.id).messages == 0  # the same message, renumbered

    uid = dovecot.append(username, raw)
    result = poll_account(account.id)

    assert result.messages == 1
    validity = dovecot.folder_status(username)[b"UIDVALIDITY"]
    # The one held from before is at its new UID, the copy at its own.
    held, copy = messages(db, account.id)
    assert (held.uidvalidity, copy.uidvalidity) == (validity, validity)
    assert held.uid < copy.uid == uid
    assert sorted(result.new_message_ids) == [copy.id]


def test_relocations_that_race_change_nothing_twice_and_raise_nothing(
    db: Session, dovecot: Dovecot, mail_account: MailAccount
) -> None:
    """A poll and an audit (not fenced) pair two byte-identical messages held from
    before a renumbering with their new UIDs differently: the first to commit wins,
    the other's relocations of a row moved already, or to a place taken, do nothing."""
    account = mail_account()
    rows: list[dict[str, Any]] = [
        {
            "account_id": account.id,
            "folder": "INBOX",
            "uidvalidity": 1,
            "uid": uid,
            "size": 1,
            "flags": [],
            "to_addrs": [],
            "cc_addrs": [],
            "process_failures": 0,
            "ingested_at": utcnow(),
        }
        for uid in (1, 2)
    ]
    ids = [row.id for row in bulk_insert(db, MESSAGES, rows, returning=("id",))]
    first, second = (
        cursors.Holder(message_id, "INBOX", 1, uid, None, True)
        for message_id, uid in zip(ids, (1, 2), strict=True)
    )
    cursors.relocate(db, account.id, [(first, 2, 6)])  # the audit's pairing
    cursors.relocate(db, account.id, [(first, 2, 5), (second, 2, 6)])  # the poll's

    placed = db.execute(
        select(Message.id, Message.uidvalidity, Message.uid).where(Message.id.in_(ids))
    ).all()
    assert sorted(placed) == sorted([(ids[0], 2, 6), (ids[1], 1, 2)])
    db.rollback()


def test_oversized_message_is_recorded_without_its_body(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(MAX_MESSAGE_BYTES=5000)
    username, _ = mail_user
    big = generated(1, attachment=b"y" * 20_000)
    dovecot.append_many(username, [big, generated(2)])
    account = mail_account()
    result = poll_account(account.id)
    assert result.outcome == "success"
    first, second = messages(db, account.id)
    assert first.storage_key is None and first.storage_backend is None
    assert first.size == server_size(dovecot, username, first.uid)
    assert first.skipped_reason is not None and "MAX_MESSAGE_BYTES" in first.skipped_reason
    assert second.storage_key is not None and second.skipped_reason is None
    assert len(result.new_message_ids) == 2


def server_size(dovecot: Dovecot, username: str, uid: int) -> int:
    with dovecot.client(username) as client:
        client.select_folder("INBOX", readonly=True)
        size = int(client.fetch([uid], ["RFC822.SIZE"])[uid][b"RFC822.SIZE"])
        client.logout()
    return size


def test_initial_sync_newest_takes_only_the_newest_then_everything_new(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(10)])
    account = mail_account(initial_sync="newest", initial_sync_count=3)
    assert poll_account(account.id).messages == 3
    assert [m.uid for m in messages(db, account.id)] == [8, 9, 10]
    dovecot.append(username, generated(10))
    assert poll_account(account.id).messages == 1
    assert [m.uid for m in messages(db, account.id)] == [8, 9, 10, 11]


def test_initial_sync_newest_zero_starts_from_now(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(4)])
    account = mail_account(initial_sync="newest", initial_sync_count=0)
    assert poll_account(account.id).messages == 0
    dovecot.append(username, generated(9))
    assert [m.uid for m in messages(db, account.id)] == []
    assert poll_account(account.id).messages == 1
    assert [m.uid for m in messages(db, account.id)] == [5]


def test_initial_sync_since_a_date(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    old = datetime(2020, 1, 1, 12, tzinfo=UTC)
    dovecot.append_many(username, [generated(1), generated(2)], when=old)
    dovecot.append(username, generated(3), when=datetime.now(UTC))
    account = mail_account(initial_sync="since", initial_sync_since=date(2024, 1, 1))
    assert poll_account(account.id).messages == 1
    (only,) = messages(db, account.id)
    assert only.uid == 3
    assert only.internal_date is not None and only.internal_date.year >= 2024


def test_a_renumbered_folder_is_scanned_again_from_the_oldest_message_held(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    """Under a first-sync policy, a re-scan takes everything since the oldest message
    held from the folder (not only the newest N): each one held moves to its new UID."""
    username, _ = mail_user
    dovecot.append_many(username, [generated(i) for i in range(3)], when=datetime(2020, 1, 1))
    dovecot.append_many(username, [generated(i) for i in range(3, 5)])
    account = mail_account(initial_sync="newest", initial_sync_count=2)
    assert poll_account(account.id).messages == 2

    dovecot.reset_uidvalidity(username)
    dovecot.append(username, generated(5))
    result = poll_account(account.id)

    assert result.outcome == "success" and result.messages == 1
    validity = dovecot.folder_status(username)[b"UIDVALIDITY"]
    held = messages(db, account.id)
    assert sorted(m.message_id or "" for m in held) == [f"<gen-{i}@example.org>" for i in (3, 4, 5)]
    assert {m.uidvalidity for m in held} == {validity}  # the older of the two moved too


def test_flags_are_recorded_and_left_untouched(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, _ = mail_user
    dovecot.append(username, generated(1), flags=[r"\Flagged"])
    account = mail_account()
    poll_account(account.id)
    (message,) = messages(db, account.id)
    assert message.flags == [r"\Flagged"]
    with dovecot.client(username) as client:
        client.select_folder("INBOX", readonly=True)
        flags = client.get_flags([1])[1]
        client.logout()
    assert b"\\Seen" not in flags


def test_several_folders_and_a_missing_one(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    api: TestClient,
) -> None:
    """A folder that fails is reported on that folder and retried on its own backoff;
    the others, and the mailbox's state, go on."""
    username, _ = mail_user
    dovecot.append(username, generated(1))
    dovecot.append(username, generated(2), folder="Archive")
    account = mail_account(folders=["INBOX", "Nope", "Archive"], poll_interval_seconds=60)

    result = poll_account(account.id)

    assert (result.outcome, result.account_event) == ("success", None)
    assert sorted(m.folder for m in messages(db, account.id)) == ["Archive", "INBOX"]
    db.refresh(account)
    assert (account.status, account.consecutive_failures, account.backoff_until) == (
        "active",
        0,
        None,
    )
    run = db.scalars(select(PollRun).where(PollRun.account_id == account.id)).one()
    assert run.error is not None and "Nope" in run.error  # the note of a successful poll
    listed = api.get(f"/accounts/{account.id}/folders", headers=auth_headers()).json()["items"]
    nope = next(item for item in listed if item["name"] == "Nope")
    assert "Nope" in nope["error"] and nope["failures"] == 1 and nope["retry_at"]
    assert all(item["error"] is None for item in listed if item["name"] != "Nope")

    # Not tried again before its own backoff (the interval) runs out; the others are.
    dovecot.append(username, generated(3))
    assert poll_account(account.id).messages == 1
    db.refresh(account)
    assert account.folder_errors is not None
    assert account.folder_errors["Nope"]["failures"] == 1

    # Once it exists, the next try (here forced) polls it and its error is gone.
    dovecot.append(username, generated(4), folder="Nope")
    assert poll_account(account.id, force=True).messages == 1
    db.refresh(account)
    assert account.folder_errors is None


def test_a_mailbox_whose_every_folder_fails_has_failed(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    account = mail_account(folders=["Nope", "Gone"])
    result = poll_account(account.id)
    assert result.outcome == "protocol_error"
    assert result.error is not None and "Nope" in result.error
    db.refresh(account)
    assert (account.status, account.consecutive_failures) == ("error", 1)


def test_wrong_password_is_an_auth_failure_with_backoff(
    db: Session, dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, password = mail_user
    dovecot.append(username, generated(1))
    account = mail_account(credentials={"password": password + "-wrong"})

    result = poll_account(account.id)

    assert result.outcome == "auth_error"
    assert result.account_event == "account.error"
    assert result.messages == 0
    db.refresh(account)
    assert account.status == "error"
    assert account.last_error_kind == "auth"
    assert account.last_error is not None and "authentication failed" in account.last_error
    assert password not in account.last_error
    assert account.consecutive_failures == 1
    assert account.backoff_until is not None
    assert account.last_polled_at is not None
    assert account.backoff_until - account.last_polled_at <= timedelta(seconds=60)
    run = db.scalars(select(PollRun).where(PollRun.account_id == account.id)).one()
    assert run.outcome == "auth_error" and run.error == account.last_error

    # Not retried while backing off...
    skipped = poll_account(account.id)
    assert skipped.outcome == "skipped"
    assert skipped.error is not None and "backing off" in skipped.error
    # ...until the credentials change.
    account.credentials_encrypted = crypto.encrypt_json({"password": password})
    clear_backoff(account)
    db.commit()
    recovered = poll_account(account.id)
    assert recovered.outcome == "success"
    assert recovered.account_event == "account.recovered"
    assert recovered.messages == 1
    db.refresh(account)
    assert (account.status, account.consecutive_failures) == ("active", 0)
    assert account.backoff_until is None
    assert account.last_error is None


def test_failures_back_off_exponentially_then_disable(
    db: Session,
    mail_account: MailAccount,
    mail_user: tuple[str, str],
    set_env: Callable[..., None],
) -> None:
    set_env(MAX_CONSECUTIVE_FAILURES=4, BACKOFF_MAX_SECONDS=200)
    account = mail_account(credentials={"password": "wrong"}, poll_interval_seconds=60)
    delays = []
    events = []
    for _ in range(4):
        result = poll_account(account.id)
        events.append(result.account_event)
        db.refresh(account)
        if account.backoff_until is not None:
            delays.append(
                account.backoff_until
                - db.scalars(
                    select(PollRun.started_at)
                    .where(PollRun.account_id == account.id)
                    .order_by(PollRun.id.desc())
                    .limit(1)
                ).one()
            )
        db.execute(update(Account).where(Account.id == account.id).values(backoff_until=None))
        db.commit()
    assert [d.total_seconds() for d in delays] == [60, 120, 200]
    assert events == ["account.error", None, None, "account.disabled"]
    db.refresh(account)
    assert (account.enabled, account.status, account.consecutive_failures) == (False, "disabled", 4)
    assert account.disabled_reason is not None and "4 consecutive" in account.disabled_reason
    skipped = poll_account(account.id)
    assert (skipped.outcome, skipped.error) == ("skipped", "account is disabled")


def test_missing_account_is_skipped() -> None:
    result = poll_account(999_999)
    assert (result.outcome, result.new_message_ids) == ("skipped", [])


def test_a_poll_collects_garbage_less_often(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parsing, "GC_THRESHOLDS", (12_345, 20, 30))
    before = gc.get_threshold()
    try:
        username, _ = mail_user
        dovecot.append_many(username, [generated(1)])
        assert poll_account(mail_account().id).messages == 1
        assert gc.get_threshold() == (12_345, 20, 30)
    finally:
        gc.set_threshold(*before)
