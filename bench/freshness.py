"""Freshness at scale: `python -m bench.freshness [ACCOUNTS]` (100,000 by default).

A dedicated PostgreSQL database with ACCOUNTS mailboxes at a 5-minute interval, written
by `INSERT ... SELECT generate_series`: one in a hundred last polled completely two hours
ago (stale), one in twenty disabled, the rest a moment ago. Times what every check of
freshness costs: the count and the worst (`staleness`: /health, /admin/capacity, a
scrape), the first `check` (marks 1 % stale; no webhook target is set, so no deliveries)
and a steady `check` (nothing changed), each the median of 5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from cryptography.fernet import Fernet
from sqlalchemy import text

from tests.support import postgres


def timed(label: str, call: object, runs: int = 5) -> None:
    assert callable(call)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    print(f"  {label}: median {statistics.median(samples) * 1000:.0f} ms of {runs}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("accounts", type=int, nargs="?", default=100_000)
    args = parser.parse_args()
    database_url = postgres.create_database("mailbeat_bench_freshness")
    try:
        os.environ.update(
            ENVIRONMENT="test",
            DATABASE_URL=database_url,
            ENCRYPTION_KEY=Fernet.generate_key().decode(),
            SCHEDULER_MODE="local",
            WEBHOOK_URL="",
        )
        from alembic import command
        from alembic.config import Config

        command.upgrade(Config(str(Path(__file__).parent.parent / "alembic.ini")), "head")

        from backend.audit import freshness
        from backend.db import session_scope

        with session_scope() as session:
            session.execute(
                text(
                    """
                    INSERT INTO accounts (email, imap_host, imap_port, imap_security,
                        username, auth_method, credentials_encrypted, folders,
                        poll_interval_seconds, priority, enabled, initial_sync, status,
                        last_polled_at, last_success_at, consecutive_failures,
                        message_count, created_at, updated_at)
                    SELECT 'user' || i || '@example.com', 'imap.example.com', 993, 'ssl',
                        'user' || i, 'password', 'x', '["INBOX"]', 300, 5, i % 20 <> 7,
                        'all', CASE WHEN i % 20 = 7 THEN 'disabled' ELSE 'active' END,
                        now(), CASE WHEN i % 100 = 3 THEN now() - interval '2 hours'
                                    ELSE now() - (i % 300) * interval '1 second' END,
                        0, 0, now() - interval '30 days', now()
                    FROM generate_series(1, :count) AS i
                    """
                ),
                {"count": args.accounts},
            )
            session.execute(text("ANALYZE accounts"))
        print(f"{args.accounts:,} mailboxes, 1 in 100 stale:")

        def count() -> None:
            with session_scope() as session:
                assert freshness.staleness(session).stale == args.accounts // 100

        timed("staleness (count and worst)", count)
        started = time.perf_counter()
        marked = freshness.check()["account.stale"]
        print(
            f"  first check: {len(marked):,} marked stale in "
            f"{(time.perf_counter() - started) * 1000:.0f} ms"
        )
        timed("steady check (nothing changed)", freshness.check)
        print(f"load: {os.getloadavg()}")
    finally:
        from backend import db

        db.reset_caches()
        postgres.drop_database(database_url)


if __name__ == "__main__":
    main()
