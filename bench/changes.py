"""What change tracking costs (backend/mailbox/changes.py), in one process on private
Dovecots: `python -m bench.changes [MAILBOXES] [ROUNDS] [FOLDER_MESSAGES]` (default
2,000 mailboxes, 2 rounds, 100,000 messages).

1. Idle polls: MAILBOXES mailboxes of one message each, on a Dovecot with CONDSTORE and
   QRESYNC and on one offering neither, each polled once; then, with `track_changes` off
   and on in turn, a round to settle and ROUNDS rounds of `run_poll` over every mailbox
   that find nothing. Reports milliseconds per idle poll (the session pool as deployed:
   IMAP_POOL_SIZE sessions per process, so with this many mailboxes nearly every poll
   logs in).
2. The deletion check: one folder of FOLDER_MESSAGES messages on a server without
   CONDSTORE or QRESYNC (with ESEARCH), its rows as a first sync leaves them; 5 messages
   are expunged, and one poll finds them (STATUS's counts show the expunge, so the UID set
   is compared). Reports the poll's time, the UID SEARCH's, the database's and the IMAP
   round trips; then the hourly full check (every message's flags too).
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, cast

from bench.stack import Stack, load_average
from tests.support.dovecot import Dovecot
from tests.support.mail import generated

PLAIN = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE UIDPLUS MOVE NAMESPACE ESEARCH SEARCHRES"


def small(index: int) -> bytes:
    return (
        f"From: a@example.org\r\nTo: b@example.org\r\nSubject: m {index}\r\n"
        f"Message-ID: <m{index}@example.org>\r\n\r\nbody {index}\r\n"
    ).encode()


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    folder_messages = int(sys.argv[3]) if len(sys.argv) > 3 else 100_000
    print(f"{mailboxes} mailboxes, {rounds} rounds; {load_average()}")
    with Stack(dovecot=True) as stack:
        assert stack.dovecot is not None
        plain = Dovecot(stack.root / "plain", capabilities=PLAIN)
        plain.start()
        try:
            # Off and on twice where the target is (within 10 %), once without CONDSTORE.
            idle_polls("CONDSTORE+QRESYNC", stack.dovecot, mailboxes, rounds, repeat=2)
            idle_polls("neither", plain, mailboxes, rounds, repeat=1)
            deletion_check(plain, folder_messages)
        finally:
            plain.stop()


def accounts_on(
    server: Dovecot, count: int, raws: Callable[[int], list[bytes]], prefix: str = "idle"
) -> list[int]:
    from backend import crypto
    from backend.db import session_scope
    from backend.models import Account

    secret = crypto.encrypt_json({"password": "pw"})
    ids = []
    with session_scope() as session:
        for index in range(count):
            username = f"{prefix}-{index}"
            server.add_user(username, "pw")
            server.write_maildir(username, raws(index))
            account = Account(
                email=f"{username}@example.org",
                imap_host=server.host,
                imap_port=server.imap_port,
                imap_security="none",
                username=username,
                credentials_encrypted=secret,
                folders=["INBOX"],
                poll_interval_seconds=60,
            )
            session.add(account)
            session.flush()
            ids.append(account.id)
    return ids


def idle_polls(name: str, server: Dovecot, mailboxes: int, rounds: int, *, repeat: int) -> None:
    from sqlalchemy import event, update

    from backend.db import get_engine, session_scope
    from backend.mailbox import imap, polling
    from backend.models import Account

    counted = {"imap": 0, "sql": 0}
    command = imap.ImapSession._command

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted["imap"] += 1
        return command(self, *args, **kwargs)

    def statement(*_args: Any) -> None:
        counted["sql"] += 1

    imap.ImapSession._command = counting  # type: ignore[method-assign]
    event.listen(get_engine(), "before_cursor_execute", statement)

    ids = accounts_on(server, mailboxes, lambda index: [generated(index)])
    for account_id in ids:
        polling.run_poll(account_id, None)
    for tracking in (False, True) * repeat:
        with session_scope() as session:
            session.execute(
                update(Account).where(Account.id.in_(ids)).values(track_changes=tracking)
            )
        for account_id in ids:  # settles: a first tracked poll sets each folder's baseline
            polling.run_poll(account_id, None)
        counted.update(imap=0, sql=0)
        started = time.perf_counter()
        for _ in range(rounds):
            for account_id in ids:
                polling.run_poll(account_id, None)
        polls = rounds * len(ids)
        per_poll = (time.perf_counter() - started) / polls * 1000
        print(
            f"{name}, tracking {'on' if tracking else 'off'}: {per_poll:.2f} ms per idle poll "
            f"({polls} polls; per poll {counted['imap'] / polls:.2f} IMAP commands, "
            f"{counted['sql'] / polls:.2f} SQL statements); {load_average()}"
        )
    imap.ImapSession._command = command  # type: ignore[method-assign]
    event.remove(get_engine(), "before_cursor_execute", statement)


def state(uidvalidity: int, uidnext: int, messages: int, checked: str | None) -> dict[str, Any]:
    """A folder's change tracking state (Account.change_state), no CONDSTORE."""
    return {
        "uidvalidity": uidvalidity,
        "highestmodseq": None,
        "uidnext": uidnext,
        "messages": messages,
        "full_check_at": checked,
    }


def deletion_check(server: Dovecot, count: int) -> None:
    from sqlalchemy import Table, event, update

    from backend.db import bulk_insert, get_engine, session_scope
    from backend.mailbox import imap, polling
    from backend.models import Account, FolderCursor, Message, utcnow

    [account_id] = accounts_on(server, 1, lambda _: [small(i) for i in range(count)], "big")
    username = "big-0"
    with server.client(username) as client:
        status = client.folder_status("INBOX", [b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"])
        client.logout()
    uidvalidity, uidnext = int(status[b"UIDVALIDITY"]), int(status[b"UIDNEXT"])
    now = utcnow()
    rows = [
        {
            "account_id": account_id,
            "folder": "INBOX",
            "uidvalidity": uidvalidity,
            "uid": uid,
            "message_id": f"<m{uid - 1}@example.org>",
            "flags": [],
            "to_addrs": [],
            "cc_addrs": [],
            "size": 80,
            "ingested_at": now,
        }
        for uid in range(1, count + 1)
    ]
    with session_scope() as session:
        bulk_insert(session, cast(Table, Message.__table__), rows)
        session.add(
            FolderCursor(
                account_id=account_id,
                folder="INBOX",
                uidvalidity=uidvalidity,
                last_uid=count,
                uidnext=uidnext,
                updated_at=now,
            )
        )
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(change_state={"INBOX": state(uidvalidity, uidnext, count, now.isoformat())})
        )
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(name: str) -> None:
        original = getattr(imap.ImapSession, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - began
                calls[name] += 1

        setattr(imap.ImapSession, name, wrapper)

    for name in ("status", "select", "search", "fetch_flags", "uid_set"):
        timed(name)
    began: list[float] = []

    def start(*_args: Any) -> None:
        began.append(time.perf_counter())

    def stop(*_args: Any) -> None:
        spent["database"] += time.perf_counter() - began.pop()

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", start)
    event.listen(engine, "after_cursor_execute", stop)

    def one_poll(label: str) -> None:
        spent.clear()
        calls.clear()
        started = time.perf_counter()
        result = polling.run_poll(account_id, None)
        took = (time.perf_counter() - started) * 1000
        parts = ", ".join(
            f"{name} {seconds * 1000:.1f} ms" + (f" x{calls[name]}" if name in calls else "")
            for name, seconds in spent.items()
        )
        print(f"{label}: {took:.0f} ms ({parts}); {result!r:.60}; {load_average()}")

    with server.client(username) as client:
        client.select_folder("INBOX")
        gone = [count // 7, count // 3, count // 2, count - 10, count - 1]
        client.add_flags(gone, [b"\\Deleted"])
        client.uid_expunge(gone)
        client.logout()
    one_poll(f"deletion check, {count} messages, 5 expunged")
    with session_scope() as session:
        session.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(change_state={"INBOX": state(uidvalidity, uidnext, count - 5, None)})
        )
    one_poll(f"full check, {count} messages (every flag and the UID set)")
    event.remove(engine, "before_cursor_execute", start)
    event.remove(engine, "after_cursor_execute", stop)


if __name__ == "__main__":
    main()
