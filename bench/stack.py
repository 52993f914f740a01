"""A private environment for the scheduling benchmarks: a fresh PostgreSQL database
(migrated), a Redis database index of its own, a temporary data directory, optionally a
private Dovecot, and `celery beat` / `celery worker` processes from this checkout.
Everything is removed or stopped on exit.

    with Stack(dovecot=True) as stack:
        stack.celery.beat(); stack.celery.worker("w1")
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from cryptography.fernet import Fernet

from tests.support import postgres
from tests.support.celery import Celery
from tests.support.dovecot import Dovecot
from tests.support.redis_db import RedisDb


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(session_id: int) -> float:
    """User + system CPU time of every live process of a session (a process started with
    start_new_session and what it forked), with what they reaped of their children's:
    a count that only grows while processes come and go (Dovecot's imap processes)."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == session_id:
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return f"load average {one}, {five}, {fifteen}"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class Stack:
    def __init__(
        self, *, dovecot: bool = False, imap_connections: int = 512, **settings: object
    ) -> None:
        self.want_dovecot = dovecot
        self.imap_connections = imap_connections
        self.settings = settings
        self.root = Path(tempfile.mkdtemp(prefix="mailbeat-bench-"))
        self.root.chmod(0o755)  # Dovecot's own users must reach the users and homes below
        self.redis_db = RedisDb()
        self.database_url = ""
        self.dovecot: Dovecot | None = None
        self.celery = Celery(self.root)
        self._saved_env = dict(os.environ)

    def __enter__(self) -> Stack:
        self.database_url = postgres.create_database("mailbeat_bench")
        self.redis_db.claim()
        os.environ.update(
            ENVIRONMENT="test",
            DATA_DIR=str(self.root / "data"),
            LOCAL_STORAGE_DIR=str(self.root / "data" / "storage"),
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_db.url,
            ENCRYPTION_KEY=Fernet.generate_key().decode(),
            ADMIN_API_TOKEN="bench",
            MIN_POLL_INTERVAL_SECONDS="1",
            LOG_LEVEL="WARNING",
            **{name.upper(): str(value) for name, value in self.settings.items()},
        )
        from alembic import command
        from alembic.config import Config

        from tests.support.env import reset_caches

        reset_caches()
        command.upgrade(Config(str(Path(__file__).parent.parent / "alembic.ini")), "head")
        if self.want_dovecot:
            self.dovecot = Dovecot(self.root / "dovecot", imap_connections=self.imap_connections)
            self.dovecot.start()
        return self

    def add_mailboxes(
        self, raws: Callable[[int], list[bytes]], count: int, interval: int, *, push: bool = False
    ) -> None:
        """`count` Dovecot mailboxes (mailbox n holding `raws(n)`) with their accounts,
        polled every `interval` seconds over plain IMAP (and watched, with `push`)."""
        from backend import crypto
        from backend.db import session_scope
        from backend.models import Account

        assert self.dovecot is not None
        with session_scope() as session:
            for index in range(count):
                username = f"bench-{index}-{uuid.uuid4().hex[:6]}"
                password = self.dovecot.add_user(username, "pw")
                self.dovecot.write_maildir(username, raws(index))
                session.add(
                    Account(
                        email=f"{username}@example.org",
                        imap_host=self.dovecot.host,
                        imap_port=self.dovecot.imap_port,
                        imap_security="none",
                        username=username,
                        credentials_encrypted=crypto.encrypt_json({"password": password}),
                        poll_interval_seconds=interval,
                        push=push,
                    )
                )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.celery.stop_all()
        if self.dovecot is not None:
            self.dovecot.stop()
        from backend import db

        db.reset_caches()
        time.sleep(0.5)
        postgres.drop_database(self.database_url)
        self.redis_db.release()
        os.environ.clear()
        os.environ.update(self._saved_env)
        shutil.rmtree(self.root, ignore_errors=True)
