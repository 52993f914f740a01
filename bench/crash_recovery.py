"""A poll worker SIGKILLed in the middle of first syncs, under steady mail:
`python -m bench.crash_recovery [MAILBOXES] [MESSAGES] [KILL_AFTER]` (default 4
mailboxes of 1,500 messages, the worker killed once 600 are stored).

A private Dovecot, PostgreSQL database and Redis index (bench/stack.py), Celery beat, a
processor (workflow and default queues: the sweep runs there) and a poll worker of
MAILBOXES processes; the settings are the defaults (MAILBOX_LEASE_SECONDS 20, the sweep
every 10 s, POLL_TIME_LIMIT_SECONDS 660, a 300 s interval). Every mailbox gets one new
message a second throughout. The first syncs are sent at once; once KILL_AFTER messages
are stored the poll worker's process group is SIGKILLed and a fresh worker started.

Reports, for each mailbox whose sync the kill interrupted, the seconds from the kill to
its next stored message; then stops the mail, polls every mailbox once more and
confirms every UID on the server is stored exactly once.
"""

from __future__ import annotations

import sys
import threading
import time

from sqlalchemy import func, select

from bench.stack import Stack, load_average
from tests.support.mail import generated
from tests.support.wait import wait_for

INTERVAL = 300


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    kill_after = int(sys.argv[3]) if len(sys.argv) > 3 else 600
    print(
        f"{mailboxes} mailboxes of {messages} messages, SIGKILL after {kill_after} stored; "
        f"{load_average()}"
    )
    with Stack(dovecot=True, SCHEDULER_MODE="celery") as stack:
        from backend.config import get_settings
        from backend.db import session_scope
        from backend.models import Account, Message
        from backend.schedules import service as schedules

        dovecot = stack.dovecot
        assert dovecot is not None
        stack.add_mailboxes(
            lambda n: [generated(n * messages + i) for i in range(messages)],
            mailboxes,
            INTERVAL,
        )
        with session_scope() as session:
            accounts = {
                row.id: row.username
                for row in session.execute(select(Account.id, Account.username))
            }
        settings = get_settings()
        print(
            f"MAILBOX_LEASE_SECONDS {settings.mailbox_lease_seconds:g}, "
            f"POLL_TIME_LIMIT_SECONDS {settings.poll_time_limit_seconds}"
        )

        def stored() -> dict[int, int]:
            with session_scope() as session:
                rows = session.execute(
                    select(Message.account_id, func.count()).group_by(Message.account_id)
                )
                return {account_id: count for account_id, count in rows}

        def newest() -> dict[int, float]:
            with session_scope() as session:
                rows = session.execute(
                    select(Message.account_id, func.max(Message.ingested_at)).group_by(
                        Message.account_id
                    )
                )
                return {account_id: at.timestamp() for account_id, at in rows}

        stop_mail = threading.Event()

        def steady_mail() -> None:
            index = 10_000_000
            while not stop_mail.wait(1.0):
                for username in accounts.values():
                    dovecot.append(username, generated(index, message_id=False))
                    index += 1

        mail = threading.Thread(target=steady_mail, name="steady-mail", daemon=True)
        celery = stack.celery
        celery.beat()
        celery.worker("processor", concurrency=2, queues="workflow,default")
        poller = celery.worker("poller", concurrency=mailboxes, queues="email")
        mail.start()
        for account_id in accounts:
            schedules.enqueue_poll(account_id)
        wait_for(
            lambda: sum(stored().values()) >= kill_after,
            f"{kill_after} messages stored",
            600,
            interval=0.2,
            details=celery.logs,
        )
        poller.kill()
        killed_at = time.time()
        at_kill = stored()
        interrupted = [a for a in accounts if at_kill.get(a, 0) < messages]
        print(f"killed with {sum(at_kill.values())} stored: {at_kill}")
        celery.worker("fresh", concurrency=mailboxes, queues="email")

        resumed: dict[int, float] = {}

        def all_resumed() -> bool:
            for account_id, at in newest().items():
                if account_id in interrupted and at > killed_at and account_id not in resumed:
                    resumed[account_id] = at - killed_at
            return len(resumed) == len(interrupted)

        wait_for(all_resumed, "every interrupted mailbox to store again", 900, interval=0.2)
        for account_id in interrupted:
            seconds = resumed[account_id]
            print(f"mailbox {account_id}: next message stored {seconds:.1f}s after the kill")
        print(
            f"kill to next stored message: max {max(resumed.values()):.1f}s, "
            f"min {min(resumed.values()):.1f}s over {len(resumed)} mailboxes"
        )

        stop_mail.set()
        mail.join()

        def on_server() -> dict[int, list[int]]:
            uids = {}
            for account_id, username in accounts.items():
                client = dovecot.client(username)
                client.select_folder("INBOX", readonly=True)
                uids[account_id] = sorted(client.search("ALL"))
                client.logout()
            return uids

        server = on_server()
        want = {account_id: len(uids) for account_id, uids in server.items()}

        def caught_up() -> bool:
            if stored() == want:
                return True
            for account_id in accounts:
                schedules.enqueue_news_poll(account_id)  # coalesced: one waiting at most
            return False

        wait_for(caught_up, "every message stored", 900, interval=2.0)
        with session_scope() as session:
            for account_id, uids in server.items():
                held = list(
                    session.scalars(
                        select(Message.uid)
                        .where(Message.account_id == account_id)
                        .order_by(Message.uid)
                    )
                )
                assert held == uids, f"mailbox {account_id}: stored UIDs differ from the server's"
        print(
            f"exactly once: {sum(want.values())} messages on the server, each stored once; "
            f"{load_average()}"
        )


if __name__ == "__main__":
    main()
