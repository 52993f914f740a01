"""The admin API with many mailboxes: `python -m bench.api [ACCOUNTS] [MESSAGES]`.

A fresh PostgreSQL database and Redis index; ACCOUNTS mailboxes and MESSAGES messages in
one of them are written straight to SQL, then each route is timed through the real app
(in process, TestClient).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from cryptography.fernet import Fernet
from fastapi.testclient import TestClient

from tests.support import postgres
from tests.support.redis_db import RedisDb

TOKEN = "bench-token"


def _timed(count: int, action: Callable[[], object]) -> str:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p95 = samples[max(int(len(samples) * 0.95) - 1, 0)]
    return f"p50 {statistics.median(samples):8.1f} ms  p95 {p95:8.1f} ms"


def _fill(accounts: int, messages: int) -> int:
    from sqlalchemy import insert

    from backend import crypto
    from backend.db import session_scope
    from backend.models import Account, Message

    secret = crypto.encrypt_json({"password": "bench"})
    with session_scope() as session:
        session.execute(
            insert(Account),
            [
                {
                    "email": f"user{i}@example.com",
                    "imap_host": "imap.example.com",
                    "imap_port": 993,
                    "imap_security": "ssl",
                    "username": f"user{i}",
                    "auth_method": "password",
                    "credentials_encrypted": secret,
                    "folders": ["INBOX"],
                    "poll_interval_seconds": 300,
                    "status": "error" if i % 10 == 0 else "active",
                }
                for i in range(accounts)
            ],
        )
    first = 1
    with session_scope() as session:
        for start in range(0, messages, 10_000):
            session.execute(
                insert(Message),
                [
                    {
                        "account_id": first,
                        "folder": "INBOX",
                        "uidvalidity": 1,
                        "uid": uid + 1,
                        "subject": f"message {uid}",
                        "size": 1000,
                    }
                    for uid in range(start, min(start + 10_000, messages))
                ],
            )
    return first


def main() -> None:
    accounts = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    database_url = postgres.create_database("mailbeat_bench")
    redis_db = RedisDb().claim()
    os.environ.update(
        ENVIRONMENT="test",
        DATABASE_URL=database_url,
        REDIS_URL=redis_db.url,
        DATA_DIR=tempfile.mkdtemp(prefix="bench-api-"),
        ENCRYPTION_KEY=Fernet.generate_key().decode(),
        ADMIN_API_TOKEN=TOKEN,
        SCHEDULER_MODE="celery",
    )
    try:
        from backend.cli import migrate

        migrate()
        from backend.config import get_settings
        from backend.main import create_app

        account_id = _fill(accounts, messages)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with TestClient(create_app(), headers=headers) as api:
            print(f"{accounts} mailboxes, {messages} messages in one")
            start = time.perf_counter()
            counts = api.post("/admin/email-worker/sync").json()
            print(f"sync (first: {counts}) {time.perf_counter() - start:.2f} s")
            print(
                "sync (unchanged)            ",
                _timed(3, lambda: api.post("/admin/email-worker/sync")),
            )
            print(
                "GET /accounts?limit=500     ", _timed(20, lambda: api.get("/accounts?limit=500"))
            )
            print(
                "GET /accounts?status=error  ",
                _timed(20, lambda: api.get("/accounts?status=error&limit=50")),
            )
            print(
                "GET /accounts/{id}          ",
                _timed(50, lambda: api.get(f"/accounts/{account_id}")),
            )
            print(
                "GET messages (first page)   ",
                _timed(20, lambda: api.get(f"/accounts/{account_id}/messages")),
            )
            print(
                "GET messages (offset 90000) ",
                _timed(10, lambda: api.get(f"/accounts/{account_id}/messages?offset=90000")),
            )
            print(
                "GET /admin/schedules?limit=1000",
                _timed(10, lambda: api.get("/admin/schedules?limit=1000")),
            )
            # Each scrape computing its gauges, then scrapes within METRICS_CACHE_SECONDS.
            os.environ["METRICS_CACHE_SECONDS"] = "0"
            get_settings.cache_clear()
            print("GET /metrics (no cache)     ", _timed(10, lambda: api.get("/metrics")))
            os.environ["METRICS_CACHE_SECONDS"] = "3600"
            get_settings.cache_clear()
            print("GET /metrics (cached)       ", _timed(50, lambda: api.get("/metrics")))
            print("GET /health (no worker)     ", _timed(3, lambda: api.get("/health")))
            print(
                "PATCH interval (+ schedule) ",
                _timed(
                    20,
                    lambda: api.patch(
                        f"/accounts/{account_id}", json={"poll_interval_seconds": 60}
                    ),
                ),
            )
    finally:
        from backend.db import reset_caches

        reset_caches()
        postgres.drop_database(database_url)
        redis_db.release()


if __name__ == "__main__":
    main()
