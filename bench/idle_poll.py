"""Where an idle poll's time goes, in one process on a private Dovecot:
`python -m bench.idle_poll [MAILBOXES] [ROUNDS]` (default 4 mailboxes, 50 rounds).

Every mailbox holds one message and is polled once; then ROUNDS rounds of `run_poll`
over the mailboxes find nothing new. Reports milliseconds per idle poll: in all, and
spent in logging in (connect + LOGIN), the kept session's check (NOOP; RESUME, a CLOSE
or a NOOP, since the check became `ImapSession.resume`), STATUS, SELECT, SEARCH, and database
statements (with their transactions' BEGIN/COMMIT round trips); "other" is the rest
(Python, the Redis lock, metrics). Where the settings know IMAP_POOL_SIZE, the rounds
run once with IMAP_POOL_SIZE=0 (a login per poll) and once with the default.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from bench.stack import Stack, load_average
from tests.support.mail import generated


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    print(f"{mailboxes} mailboxes, {rounds} rounds of idle polls; {load_average()}")
    with Stack(dovecot=True) as stack:
        from sqlalchemy import event

        from backend import config, crypto
        from backend.db import get_engine, session_scope
        from backend.mailbox import imap, polling, service
        from backend.models import Account

        dovecot = stack.dovecot
        assert dovecot is not None
        ids = []
        with session_scope() as session:
            for index in range(mailboxes):
                username = f"idle-{index}"
                password = dovecot.add_user(username, "pw")
                dovecot.append(username, generated(index))
                account = Account(
                    email=f"{username}@example.org",
                    imap_host=dovecot.host,
                    imap_port=dovecot.imap_port,
                    imap_security="none",
                    username=username,
                    credentials_encrypted=crypto.encrypt_json({"password": password}),
                    folders=["INBOX"],
                    poll_interval_seconds=60,
                )
                session.add(account)
                session.flush()
                ids.append(account.id)
        for account_id in ids:
            polling.run_poll(account_id, None)

        spent: dict[str, float] = defaultdict(float)

        def timed(owner: Any, name: str, label: str) -> None:
            original: Callable[..., Any] | None = getattr(owner, name, None)
            if original is None:
                return

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent[label] += time.perf_counter() - began

            setattr(owner, name, wrapper)

        timed(service, "open_mailbox", "login")
        for name in ("noop", "resume", "status", "select", "search"):
            timed(imap.ImapSession, name, name.upper())
        began: list[float] = []
        engine = get_engine()

        def start(*_args: Any) -> None:
            began.append(time.perf_counter())

        def stop(*_args: Any) -> None:
            spent["database"] += time.perf_counter() - began.pop()

        event.listen(engine, "before_cursor_execute", start)
        event.listen(engine, "after_cursor_execute", stop)
        event.listen(engine, "begin", start)
        event.listen(engine, "commit", stop)

        sizes = ["0", ""] if hasattr(config.Settings(), "imap_pool_size") else [""]
        for size in sizes:
            if size:
                os.environ["IMAP_POOL_SIZE"] = size
            else:
                os.environ.pop("IMAP_POOL_SIZE", None)
            config.get_settings.cache_clear()
            spent.clear()
            started = time.perf_counter()
            for _ in range(rounds):
                for account_id in ids:
                    polling.run_poll(account_id, None)
            polls = rounds * len(ids)
            total = (time.perf_counter() - started) / polls * 1000
            parts = {label: seconds / polls * 1000 for label, seconds in spent.items()}
            shown = ", ".join(f"{label} {ms:.1f}" for label, ms in parts.items())
            print(
                f"IMAP_POOL_SIZE={size or 'default'}: {total:.1f} ms per idle poll: {shown}, "
                f"other {total - sum(parts.values()):.1f}; {load_average()}"
            )


if __name__ == "__main__":
    main()
