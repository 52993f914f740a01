"""The audit of one big folder: seconds, IMAP round trips and database time.

    python -m bench.audit [--messages 100000] [--lost 100]

A private Dovecot with one mailbox of N small messages, written straight into its
maildir; the database and the local store as a complete first sync leaves them (rows
inserted in bulk, objects written as files, the cursor at the last UID: the poll itself
is not what is measured). Then, timed:

1. a shallow audit of the folder as it is (nothing to repair);
2. a deep audit (every object read and hashed);
3. a shallow audit after a "restore": `--lost` rows deleted and `--lost` other objects'
   files deleted, which it finds and repairs (checked: every row back, byte for byte);
4. for scale, a poll that finds nothing new, and an audit of a 1,000-message mailbox.

Round trips are IMAP commands sent (`ImapSession._command` calls, counted); database
time is the time spent in statements (SQLAlchemy cursor events).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import delete, event, select, text

from tests.support import postgres
from tests.support.dovecot import Dovecot


def build_message(index: int) -> bytes:
    body = f"Message {index} of the audit benchmark.\r\n" * 20
    return (
        f"From: Sender {index % 97} <sender{index % 97}@example.org>\r\n"
        "To: Bench <bench@example.org>\r\n"
        f"Subject: Audit benchmark {index}\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <audit-{index}@example.org>\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"{body}"
    ).encode()


class Counters:
    def __init__(self) -> None:
        self.round_trips = 0
        self.statements = 0
        self.db_seconds = 0.0


COUNTERS = Counters()


def instrument() -> None:
    from backend.db import get_engine
    from backend.mailbox.imap import ImapSession

    original = ImapSession._command

    def counted(self: ImapSession, command: Any, **kwargs: Any) -> Any:
        COUNTERS.round_trips += 1
        return original(self, command, **kwargs)

    ImapSession._command = counted  # type: ignore[method-assign]
    engine = get_engine()

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, *_: Any) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, *_: Any) -> None:
        COUNTERS.statements += 1
        COUNTERS.db_seconds += time.perf_counter() - conn.info["bench_started"].pop()


@contextmanager
def measured(label: str) -> Iterator[None]:
    COUNTERS.round_trips = COUNTERS.statements = 0
    COUNTERS.db_seconds = 0.0
    started = time.perf_counter()
    yield
    elapsed = time.perf_counter() - started
    print(
        f"  {label}: {elapsed:.2f} s, {COUNTERS.round_trips} IMAP round trips, "
        f"{COUNTERS.statements} statements, {COUNTERS.db_seconds:.2f} s in the database"
    )


def uid_map(dovecot: Dovecot, username: str) -> dict[int, int]:
    """{message index: UID}, from Dovecot's uidlist once it has read the maildir."""
    with dovecot.client(username) as client:
        client.select_folder("INBOX", readonly=True)
        client.logout()
    uids: dict[int, int] = {}
    lines = (dovecot.maildir(username) / "dovecot-uidlist").read_text().splitlines()
    for line in lines[1:]:
        uid, _, rest = line.partition(" ")
        name = rest.split(":", 1)[-1] if rest.startswith(":") else rest.split()[-1]
        index = int(name.split(".M", 1)[1].split("P", 1)[0])
        uids[index] = int(uid)
    return uids


def seed(dovecot: Dovecot, username: str, count: int) -> tuple[int, dict[int, bytes]]:
    """The mailbox on the server and as a complete first sync stored it: returns the
    account id and {uid: raw}."""
    from backend import crypto
    from backend.db import bulk_insert, session_scope
    from backend.mailbox.service import MESSAGE_KEY, MESSAGES
    from backend.models import Account, FolderCursor, StorageBackend, utcnow
    from backend.storage import service as storage
    from backend.storage.base import message_key

    dovecot.add_user(username, "bench-password")
    raws = [build_message(index) for index in range(count)]
    dovecot.write_maildir(username, raws)
    by_uid = {uid: raws[index] for index, uid in uid_map(dovecot, username).items()}
    uidvalidity = int(dovecot.folder_status(username)[b"UIDVALIDITY"])
    now = utcnow()
    with session_scope() as session:
        account = Account(
            email=f"{username}@example.org",
            imap_host=dovecot.host,
            imap_port=dovecot.imap_port,
            imap_security="none",
            username=username,
            auth_method="password",
            credentials_encrypted=crypto.encrypt_json({"password": "bench-password"}),
            folders=["INBOX"],
            last_success_at=now,
            message_count=count,
        )
        session.add(account)
        session.flush()
        account_id = account.id
        session.add(
            FolderCursor(
                account_id=account_id,
                folder="INBOX",
                uidvalidity=uidvalidity,
                last_uid=max(by_uid),
                updated_at=now,
            )
        )
    local = storage.local_storage()
    rows = []
    for uid, raw in sorted(by_uid.items()):
        key = message_key(account_id, "INBOX", uidvalidity, uid)
        local.put(key, raw, "message/rfc822", sync=False)
        rows.append(
            {
                "account_id": account_id,
                "folder": "INBOX",
                "uidvalidity": uidvalidity,
                "uid": uid,
                "message_id": f"<audit-{uid}@example.org>",
                "subject": "Audit benchmark",
                "from_addr": "sender@example.org",
                "to_addrs": [],
                "cc_addrs": [],
                "date": now,
                "internal_date": now,
                "flags": [],
                "size": len(raw),
                "content_hash": hashlib.sha256(raw).hexdigest(),
                "text_body": None,
                "html_body": None,
                "storage_backend": StorageBackend.LOCAL,
                "storage_key": key,
                "parse_error": None,
                "skipped_reason": None,
                "ingested_at": now,
                "processed_at": now,
            }
        )
    for start in range(0, len(rows), 5000):
        with session_scope() as session:
            bulk_insert(session, MESSAGES, rows[start : start + 5000], unique=MESSAGE_KEY)
    return account_id, by_uid


def compare_searches(account_id: int) -> None:
    """The server's UIDs as ranges (ESEARCH) against the plain SEARCH ALL list."""
    from backend.db import session_scope
    from backend.mailbox.service import open_mailbox
    from backend.models import Account

    with session_scope() as session:
        account = session.get_one(Account, account_id)
    with open_mailbox(account) as mailbox:
        mailbox.select("INBOX")
        started = time.perf_counter()
        ranges = mailbox.uid_ranges()
        esearch = time.perf_counter() - started
        started = time.perf_counter()
        uids = mailbox.search()
        plain = time.perf_counter() - started
    print(
        f"  UID SEARCH RETURN (ALL): {len(ranges)} range(s) in {esearch * 1000:.0f} ms; "
        f"plain UID SEARCH ALL: {len(uids):,} UIDs in {plain * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--lost", type=int, default=100)
    parser.add_argument("--profile", action="store_true", help="cProfile the shallow audit")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mailbeat-bench-audit-"))
    work.chmod(0o755)  # Dovecot's processes must reach the users and homes below it
    dovecot = Dovecot(work / "dovecot")
    database_url = postgres.create_database("mailbeat_bench_audit")
    try:
        dovecot.start()
        os.environ.update(
            ENVIRONMENT="test",
            DATABASE_URL=database_url,
            DATA_DIR=str(work / "data"),
            LOCAL_STORAGE_DIR=str(work / "storage"),
            ENCRYPTION_KEY=Fernet.generate_key().decode(),
            S3_BUCKET="",
            SCHEDULER_MODE="local",
        )
        from alembic import command
        from alembic.config import Config

        command.upgrade(Config(str(Path(__file__).parent.parent / "alembic.ini")), "head")

        from backend.audit.service import audit_account
        from backend.db import session_scope
        from backend.mailbox.service import poll_account
        from backend.models import Message
        from backend.storage import service as storage

        instrument()
        started = time.perf_counter()
        account_id, by_uid = seed(dovecot, "big", args.messages)
        small_id, _small = seed(dovecot, "small", 1000)
        print(f"seeded {args.messages:,} + 1,000 messages in {time.perf_counter() - started:.0f} s")
        with session_scope() as session:
            session.execute(text("ANALYZE"))

        print(f"one folder of {args.messages:,} messages:")
        compare_searches(account_id)
        profiler = cProfile.Profile() if args.profile else None
        with measured("shallow audit, nothing missing"):
            if profiler is not None:
                profiler.enable()
            [clean] = audit_account(account_id).folders
            if profiler is not None:
                profiler.disable()
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        assert (clean.missing, clean.objects_missing) == (0, 0), clean
        assert clean.server == args.messages and clean.objects_checked == args.messages
        with measured("deep audit (every object read and hashed)"):
            [deep] = audit_account(account_id, deep=True).folders
        assert deep.objects_missing == 0, deep

        # The restore: rows of some messages and objects of others gone.
        uids = sorted(by_uid)
        step = max(1, len(uids) // (2 * args.lost))
        lost_rows = uids[::step][: args.lost]
        lost_objects = [uid for uid in uids[step // 2 :: step] if uid not in lost_rows][: args.lost]
        with session_scope() as session:
            keys = dict(
                session.execute(
                    select(Message.uid, Message.storage_key).where(
                        Message.account_id == account_id, Message.uid.in_(lost_objects)
                    )
                ).all()
            )
            session.execute(
                delete(Message).where(Message.account_id == account_id, Message.uid.in_(lost_rows))
            )
        for key in keys.values():
            assert key is not None
            storage.local_storage().path_for(key).unlink()
        with measured(f"shallow audit, {args.lost} rows and {args.lost} objects lost"):
            [repaired] = audit_account(account_id).folders
        assert (repaired.missing, repaired.repaired) == (args.lost, args.lost), repaired
        assert (repaired.objects_missing, repaired.objects_repaired) == (args.lost, args.lost)
        with session_scope() as session:
            for uid in lost_rows + lost_objects:
                row = session.scalars(
                    select(Message).where(Message.account_id == account_id, Message.uid == uid)
                ).one()
                assert row.storage_key is not None and row.storage_backend is not None
                assert storage.get_object(row.storage_backend, row.storage_key) == by_uid[uid]
        print("  every lost row and object back, byte for byte")

        print("for scale, a mailbox of 1,000 messages:")
        assert poll_account(small_id).outcome == "success"  # notes each folder's UIDNEXT
        with measured("a poll that finds nothing new"):
            assert poll_account(small_id).outcome == "success"
        with measured("a shallow audit"):
            audit_account(small_id)
        print(f"load: {os.getloadavg()}")
    finally:
        from backend import db

        db.reset_caches()
        dovecot.stop()
        postgres.drop_database(database_url)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
