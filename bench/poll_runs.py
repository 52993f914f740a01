"""Pruning old poll runs: `python -m bench.poll_runs [ROWS]` (default 500,000).

A fresh PostgreSQL database holds ROWS poll runs finished 20 days ago and ROWS finished
in the last minutes; times one `prune_poll_runs()` (what the `poll_runs.prune` task runs
every 10 minutes) with POLL_RUN_RETENTION_DAYS=14, and checks that it took exactly the
old ones (at most PRUNE_CHUNK x PRUNE_MAX_CHUNKS of them).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sqlalchemy import func, select, text

from bench.stack import load_average
from tests.support import postgres

ACCOUNT = (
    "INSERT INTO accounts (email, imap_host, imap_port, imap_security, username, auth_method, "
    "credentials_encrypted, folders, poll_interval_seconds, enabled, initial_sync, status, "
    "priority, consecutive_failures, message_count, push, created_at, updated_at) VALUES "
    "('bench@example.org', 'h', 993, 'ssl', 'u', 'password', 'c', '[]', 300, true, 'all', "
    "'active', 0, 0, 0, false, now(), now())"
)
RUNS = (
    "INSERT INTO poll_runs (account_id, started_at, finished_at, outcome, messages_count, "
    "bytes_count) SELECT 1, now() - :days * interval '1 day' - g * interval '1 ms', now() - "
    ":days * interval '1 day' - g * interval '1 ms', 'success', 0, 0 "
    "FROM generate_series(1, :rows) g"
)


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
    url = postgres.create_database("mailbeat_bench")
    os.environ.update(
        DATABASE_URL=url,
        POLL_RUN_RETENTION_DAYS="14",
        ENCRYPTION_KEY="Gx0PjDGsAqQw4U3mBmaXUhnSaqZ3vjxsmKdQZ0M0l7k=",
    )
    from alembic import command
    from alembic.config import Config

    from backend import db
    from backend.mailbox.polling import PRUNE_CHUNK, PRUNE_MAX_CHUNKS, prune_poll_runs
    from backend.models import PollRun

    try:
        command.upgrade(Config(str(Path(__file__).parents[1] / "alembic.ini")), "head")
        with db.get_engine().begin() as connection:
            connection.execute(text(ACCOUNT))
            for days in (20, 0):
                connection.execute(text(RUNS), {"days": days, "rows": rows})
            connection.execute(text("ANALYZE poll_runs"))
        started = time.perf_counter()
        pruned = prune_poll_runs()
        seconds = time.perf_counter() - started
        with db.session_scope() as session:
            left = session.scalar(select(func.count(PollRun.id)))
        assert pruned == min(rows, PRUNE_CHUNK * PRUNE_MAX_CHUNKS), pruned
        assert left == 2 * rows - pruned, left
        print(
            f"pruned {pruned:,} of {2 * rows:,} poll runs in {seconds:.2f} s "
            f"({pruned / seconds:,.0f} rows/s); {load_average()}"
        )
    finally:
        db.reset_caches()
        postgres.drop_database(url)


if __name__ == "__main__":
    main()
