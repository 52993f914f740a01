"""Re-parsing stored messages: `python -m bench.reparse [MESSAGES]` (default 5,000).

A fresh PostgreSQL database holds MESSAGES stored messages of one mailbox (the test
suite's generated mail, one in four with a PDF attachment; raw bytes in local files),
their parsed fields blanked as an old parser might have left them. Times the whole
`messages reparse --account` loop (`reparse_page` over PAGE-message pages, the parsing
pool as configured) and checks that every row was fixed.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select, update

from bench.stack import load_average
from tests.support import postgres


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    url = postgres.create_database("mailbeat_bench")
    os.environ.update(
        DATABASE_URL=url,
        LOCAL_STORAGE_DIR=tempfile.mkdtemp(prefix="bench-reparse-"),
        ENCRYPTION_KEY="Gx0PjDGsAqQw4U3mBmaXUhnSaqZ3vjxsmKdQZ0M0l7k=",
        SCHEDULER_MODE="local",
        LOG_LEVEL="WARNING",
    )
    from alembic import command
    from alembic.config import Config

    from backend import db
    from backend.models import Message
    from backend.processing import reparse
    from tests.support.accounts import make_account
    from tests.support.mail import generated
    from tests.support.webhooks import store_message

    try:
        command.upgrade(Config(str(Path(__file__).parents[1] / "alembic.ini")), "head")
        with db.get_sessionmaker()() as session:
            account = make_account(session)
            for uid in range(1, count + 1):
                attachment = b"%PDF-1.4 " + bytes(20_000) if uid % 4 == 0 else None
                store_message(session, account, uid, generated(uid, attachment=attachment))
            session.execute(update(Message).values(subject=None, from_addr=None, text_body=None))
            session.commit()
            account_id = account.id
        started = time.perf_counter()
        done = reparse.Reparsed()
        while (page := reparse.reparse_page(account_id, done.last_id)).last_id:
            done.add(page)
        seconds = time.perf_counter() - started
        with db.session_scope() as session:
            blank = session.scalar(
                select(func.count()).select_from(Message).where(Message.subject.is_(None))
            )
        assert (done.reparsed, done.changed, blank) == (count, count, 0), (done, blank)
        print(
            f"re-parsed {count:,} messages in {seconds:.2f} s ({count / seconds:,.0f} "
            f"messages/s, pages of {reparse.PAGE}); {load_average()}"
        )
    finally:
        db.reset_caches()
        postgres.drop_database(url)


if __name__ == "__main__":
    main()
