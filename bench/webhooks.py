"""Processing and webhook delivery in-process (local mode) to a receiver on loopback:
`python -m bench.webhooks [COUNT]`. Each message: the processing transaction, the
delivery's claim and record transactions, the stored raw bytes read for the headers,
one signed POST."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from tests.support import postgres
from tests.support.receiver import SECRET, Receiver


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    receiver = Receiver()
    receiver.up()
    database_url = postgres.create_database("mailbeat_bench")
    os.environ.update(
        DATABASE_URL=database_url,
        LOCAL_STORAGE_DIR=tempfile.mkdtemp(prefix="bench-webhooks-"),
        ENCRYPTION_KEY="Gx0PjDGsAqQw4U3mBmaXUhnSaqZ3vjxsmKdQZ0M0l7k=",
        WEBHOOK_URL=receiver.url,
        WEBHOOK_SECRET=SECRET,  # the receiver answers 2xx only to signatures it verifies
        SCHEDULER_MODE="local",
    )
    from alembic import command
    from alembic.config import Config

    from backend.db import get_sessionmaker, reset_caches
    from backend.processing.service import hand_on
    from tests.support.accounts import make_account
    from tests.support.webhooks import store_message

    try:
        command.upgrade(Config("alembic.ini"), "head")
        session = get_sessionmaker()()
        account = make_account(session)
        ids = [store_message(session, account, uid).id for uid in range(1, count + 1)]
        session.close()
        start = time.perf_counter()
        hand_on(ids)
        elapsed = time.perf_counter() - start
        assert len(receiver.delivered()) == count
        print(
            f"{count} messages processed and delivered in {elapsed:.2f} s: "
            f"{count / elapsed:.0f} messages/s, {elapsed / count * 1000:.1f} ms each"
        )
    finally:
        receiver.down()
        reset_caches()
        postgres.drop_database(database_url)


if __name__ == "__main__":
    main()
