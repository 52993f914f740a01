"""Every admin and API route at scale, before and after, in one run:
`python -m bench.admin_routes [ACCOUNTS] [MESSAGES] [--baseline REF] [--samples N]`.

A dedicated PostgreSQL database and Redis index. ACCOUNTS mailboxes (one in ten with
status `error`, one in twenty disabled), MESSAGES messages (a fifth in mailbox 1, the
rest spread over the others), a poll run per message and dead letters are written by
`INSERT ... SELECT generate_series` in the server, so seeding 1,000,000 messages takes a
minute, not an hour; the schedule (one RedBeat entry per enabled mailbox) is built by the
real reconcile. With `--baseline REF` the database is first migrated with that commit's
code (its own alembic head) and every route is timed through that commit's app; then the
database is migrated to this tree's head and timed again through this tree's app. Each
pass runs in its own process (in-process ASGI client, no network, no worker).

The database and the Redis index are removed at exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
BUDGET_MS = 20_000  # per route


# -- one pass: time every route through the app of whichever tree is on sys.path --------


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, max(int(len(samples) * 0.95 + 0.5) - 1, 0))]
    return {"p50": statistics.median(samples), "p95": p95, "n": len(samples)}


def measure(samples: int, accounts: int, messages: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from backend.main import create_app

    rng = random.Random(21)
    counts = seeded(accounts, messages)
    errors, dead = counts["errors"], counts["dead"]
    heavy_messages, runs = counts["heavy_messages"], counts["heavy_runs"]
    routes: dict[str, Callable[[], str]] = {
        "GET /accounts (first page)": lambda: "/accounts?limit=100",
        "GET /accounts (last page, offset)": lambda: f"/accounts?limit=100&offset={accounts - 100}",
        "GET /accounts (random page, offset)": lambda: (
            f"/accounts?limit=100&offset={rng.randrange(accounts - 100)}"
        ),
        "GET /accounts (random page, after)": lambda: (
            f"/accounts?limit=100&after={rng.randrange(accounts - 100)}"
        ),
        "GET /accounts?status=error (first page)": lambda: "/accounts?status=error&limit=100",
        "GET /accounts?status=error (last page)": lambda: (
            f"/accounts?status=error&limit=100&offset={errors - 100}"
        ),
        "GET /accounts/{id}/messages (first page)": lambda: "/accounts/1/messages?limit=100",
        "GET /accounts/{id}/messages (last page)": lambda: (
            f"/accounts/1/messages?limit=100&offset={heavy_messages - 100}"
        ),
        "GET /accounts/{id}/poll-runs (first page)": lambda: "/accounts/1/poll-runs?limit=100",
        "GET /accounts/{id}/poll-runs (last page)": lambda: (
            f"/accounts/1/poll-runs?limit=100&offset={runs - 100}"
        ),
        "GET /admin/dead-letters (first page)": lambda: "/admin/dead-letters?limit=100",
        "GET /admin/dead-letters (last page)": lambda: (
            f"/admin/dead-letters?limit=100&offset={dead - 100}"
        ),
        "GET /admin/schedules (first page of 100)": lambda: "/admin/schedules?limit=100",
        "GET /admin/schedules (random page of 100)": lambda: (
            f"/admin/schedules?limit=100&offset={rng.randrange(int(accounts * 0.95) - 100)}"
        ),
        "GET /admin/schedules?limit=1000": lambda: "/admin/schedules?limit=1000",
        "GET /admin/capacity": lambda: "/admin/capacity",
        "GET /metrics": lambda: "/metrics",
        "GET /health (uncached)": lambda: "/health",
    }
    results: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(), headers=headers) as api:
        for name, path in routes.items():
            response = api.get(path())  # warm-up, and is the route there at all?
            if response.status_code != 200:
                results[name] = {"status": response.status_code, "body": response.text[:200]}
                continue
            times: list[float] = []
            # A slow route (the baseline's schedule pages) stops after 3 once over budget.
            while len(times) < samples and (len(times) < 3 or sum(times) < BUDGET_MS):
                url = path()
                start = time.perf_counter()
                response = api.get(url)
                times.append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, (url, response.text[:300])
            results[name] = _percentiles(times)
    return results


# -- the driver -------------------------------------------------------------------------


def seeded(accounts: int, messages: int) -> dict[str, int]:
    """What _seed_sql writes, for the deep pages' offsets."""
    runs = messages  # a poll run per message, 1 in 5 mailbox 1's
    return {
        "errors": accounts // 10,
        "dead": accounts // 10,
        "heavy_messages": messages // 5,
        "runs": runs,
        "heavy_runs": runs // 5,
    }


def _seed_sql(accounts: int, messages: int, secret: str) -> list[str]:
    heavy = messages // 5
    spread = messages - heavy
    runs = seeded(accounts, messages)["runs"]
    return [
        f"""
        INSERT INTO accounts (email, imap_host, imap_port, imap_security, username,
            auth_method, credentials_encrypted, folders, poll_interval_seconds, priority,
            enabled, initial_sync, status, last_polled_at, last_success_at,
            consecutive_failures, message_count, disabled_reason, created_at, updated_at)
        SELECT 'user' || i || '@example.com', 'imap.example.com', 993, 'ssl', 'user' || i,
            'password', '{secret}', '["INBOX"]', 300, 5,
            i % 20 <> 7, 'all',
            CASE WHEN i % 20 = 7 THEN 'disabled' WHEN i % 10 = 0 THEN 'error' ELSE 'active' END,
            now() - (i % 300) * interval '1 second',
            now() - (i % 300) * interval '1 second',
            0, CASE WHEN i = 1 THEN {heavy} ELSE {spread} / {accounts - 1} END,
            CASE WHEN i % 20 = 7 THEN 'bench' END,
            now() - interval '30 days', now()
        FROM generate_series(1, {accounts}) AS i
        """,
        # Mailbox 1 holds a fifth; the rest are dealt round the other mailboxes.
        f"""
        INSERT INTO messages (account_id, folder, uidvalidity, uid, message_id, subject,
            from_addr, to_addrs, cc_addrs, flags, size, content_hash, storage_backend,
            storage_key, ingested_at, processed_at)
        SELECT CASE WHEN i <= {heavy} THEN 1 ELSE 2 + (i % {accounts - 1}) END,
            'INBOX', 1, i, '<' || i || '@bench>', 'message ' || i, 'a@example.com',
            '["b@example.com"]', '[]', '[]', 2000, md5(i::text), 'local',
            'accounts/' || i || '.eml', now() - interval '1 day', now()
        FROM generate_series(1, {messages}) AS i
        """,
        # Poll history: a run per message, one in five mailbox 1's.
        f"""
        INSERT INTO poll_runs (account_id, started_at, finished_at, outcome, messages_count,
            bytes_count, task_id)
        SELECT CASE WHEN i % 5 = 0 THEN 1 ELSE 2 + (i % {accounts - 1}) END,
            now() - (i % 86400) * interval '1 second',
            now() - (i % 86400) * interval '1 second' + interval '1 second',
            'success', 1, 2000, 'task-' || i
        FROM generate_series(1, {runs}) AS i
        """,
        f"""
        INSERT INTO webhook_deliveries (event_id, event_type, dedupe_key, target, account_id,
            message_id, status, attempts, next_attempt_at, last_error, created_at)
        SELECT md5('event' || i), 'message.received', 'message:' || i, 'global',
            CASE WHEN i <= {heavy} THEN 1 ELSE 2 + (i % {accounts - 1}) END,
            i, CASE WHEN i % 10 = 0 THEN 'dead' ELSE 'delivered' END, 8, now(),
            CASE WHEN i % 10 = 0 THEN 'HTTP 500' END, now()
        FROM generate_series(1, {accounts}) AS i
        """,
    ]


def _run(code: str, tree: Path, env: dict[str, str], *args: str) -> str:
    """Python code in a process whose `backend` is the one in `tree`."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree)},
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return result.stdout


MIGRATE = "from backend.cli import migrate; migrate()"
RECONCILE = """
from backend.db import session_scope
from backend.schedules import service
with session_scope() as session:
    print(service.reconcile(session))
"""
MEASURE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); "
    "from bench_admin_routes import measure; "
    "print(json.dumps(measure(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))"
)


def _export(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], check=True, stdout=subprocess.PIPE
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the finally blocks below clean up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("accounts", type=int, nargs="?", default=100_000)
    parser.add_argument("messages", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--baseline", help="a commit to time first (e.g. main's before)")
    parser.add_argument("--samples", type=int, default=40, help="requests per route")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)

    from cryptography.fernet import Fernet
    from psycopg import connect

    from tests.support import postgres
    from tests.support.redis_db import RedisDb

    work = Path(tempfile.mkdtemp(prefix="bench-admin-routes-"))
    database_url = postgres.create_database("mailbeat_bench")
    redis_db = RedisDb().claim()
    key = Fernet.generate_key()
    env = {
        **os.environ,
        "MAILBEAT_ENV_FILE": str(work / "no-such.env"),
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_db.url,
        "DATA_DIR": str(work / "data"),
        "ENCRYPTION_KEY": key.decode(),
        "ADMIN_API_TOKEN": TOKEN,
        "SCHEDULER_MODE": "celery",
        # /health runs its checks on every call, and a ping nobody answers costs 0.2 s.
        "HEALTH_CACHE_SECONDS": "0",
        "CELERY_INSPECT_TIMEOUT_SECONDS": "0.2",
    }
    # The measuring function, importable by both trees' processes.
    (work / "bench_admin_routes.py").write_text(Path(__file__).read_text())
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    passes: dict[str, dict[str, Any]] = {}

    def vacuum() -> None:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")

    def timed_pass(label: str, tree: Path) -> None:
        started = time.perf_counter()
        _run(MIGRATE, tree, env)
        vacuum()
        print(f"{label}: migrated and vacuumed in {time.perf_counter() - started:.1f} s")
        out = _run(
            MEASURE,
            tree,
            env,
            str(work),
            str(args.samples),
            str(args.accounts),
            str(args.messages),
        )
        passes[label] = json.loads(out.strip().splitlines()[-1])
        print(f"{label}: timed; load {os.getloadavg()}")

    try:
        first = _export(args.baseline, work / "baseline") if args.baseline else ROOT
        started = time.perf_counter()
        _run(MIGRATE, first, env)
        secret = Fernet(key).encrypt(b'{"password": "bench"}').decode()
        with connect(dsn, autocommit=True) as conn:
            for statement in _seed_sql(args.accounts, args.messages, secret):
                step = time.perf_counter()
                conn.execute(statement)
                table = statement.split("INTO", 1)[1].split()[0]
                print(f"seeded {table} in {time.perf_counter() - step:.1f} s", flush=True)
        step = time.perf_counter()
        _run(RECONCILE, first, env)
        print(f"schedule built (reconcile) in {time.perf_counter() - step:.1f} s")
        print(f"seeding took {time.perf_counter() - started:.1f} s in all", flush=True)
        if args.baseline:
            timed_pass("before", first)
        timed_pass("after", ROOT)
        _report(passes, args)
    finally:
        postgres.drop_database(database_url)
        redis_db.release()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def _report(passes: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    uptime = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout
    print(
        f"\n{args.accounts} mailboxes, {args.messages} messages, {args.samples} requests "
        f"per route; uptime: {uptime.strip()}"
    )

    def cell(result: dict[str, Any] | None) -> str:
        if result is None:
            return "-"
        if "p50" not in result:
            return f"HTTP {result['status']}"
        return f"{result['p50']:.1f} / {result['p95']:.1f} ms"

    before, after = passes.get("before", {}), passes["after"]
    print("| route | before p50 / p95 | after p50 / p95 | p95 ratio |")
    print("| --- | --- | --- | --- |")
    for name, result in after.items():
        old = before.get(name)
        ratio = "-"
        if old and "p95" in old and "p95" in result:
            ratio = f"{old['p95'] / result['p95']:.1f}x"
        print(f"| `{name}` | {cell(old)} | {cell(result)} | {ratio} |")


if __name__ == "__main__":
    main()
