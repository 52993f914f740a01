"""The test bed: real PostgreSQL, Redis, Dovecot and S3 (moto server), each started and
stopped by the suite itself.

The database and Redis index are set up in `pytest_configure`, before test modules are
imported, because some modules (the Celery app) read settings at import time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.orm import Session

from backend.models import Account
from tests.support import postgres
from tests.support.accounts import MailAccount, make_account
from tests.support.cyrus import Cyrus
from tests.support.dovecot import Dovecot
from tests.support.env import reset_caches
from tests.support.redis_db import RedisDb
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, Outage
from tests.support.servers import RealServer

ADMIN_TOKEN = "test-admin-token-" + uuid.uuid4().hex

# Fixtures for every test folder: `api` and `anonymous` (the real FastAPI app through a
# TestClient), `receiver` and `webhooks_on`; and the guard against skips.
pytest_plugins = ["tests.support.api", "tests.support.webhooks", "tests.support.no_skips"]

_state: dict[str, object] = {}

SERVICE_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "REDBEAT_REDIS_URL",
    "ENVIRONMENT",
    "DATA_DIR",
    "LOCAL_STORAGE_DIR",
    "ENCRYPTION_KEY",
    "ADMIN_API_TOKEN",
    "S3_BUCKET",
    "S3_ENDPOINT_URL",
    "SCHEDULER_MODE",
)


def pytest_configure(config: pytest.Config) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="mailbeat-test-data-"))
    database_url = postgres.create_database()
    redis_db = RedisDb().claim()
    _state.update(data_dir=data_dir, database_url=database_url, redis_db=redis_db)
    for name in SERVICE_ENV:
        os.environ.pop(name, None)
    os.environ.update(
        # A developer's .env (written by `make run`) must not leak into the tests.
        MAILBEAT_ENV_FILE=str(data_dir / "no-such.env"),
        ENVIRONMENT="test",
        DATA_DIR=str(data_dir),
        LOCAL_STORAGE_DIR=str(data_dir / "storage"),
        DATABASE_URL=database_url,
        REDIS_URL=redis_db.url,
        ENCRYPTION_KEY=Fernet.generate_key().decode(),
        ADMIN_API_TOKEN=ADMIN_TOKEN,
    )
    from alembic import command
    from alembic.config import Config

    command.upgrade(Config(str(Path(__file__).parent.parent / "alembic.ini")), "head")
    reset_caches()


def pytest_unconfigure(config: pytest.Config) -> None:
    if "database_url" not in _state:
        return
    from backend import db

    db.reset_caches()
    postgres.drop_database(str(_state["database_url"]))
    redis_db = _state["redis_db"]
    assert isinstance(redis_db, RedisDb)
    redis_db.release()
    shutil.rmtree(str(_state["data_dir"]), ignore_errors=True)
    _state.clear()


@pytest.fixture(scope="session")
def database_url() -> str:
    return str(_state["database_url"])


@pytest.fixture(scope="session")
def redis_db() -> RedisDb:
    value = _state["redis_db"]
    assert isinstance(value, RedisDb)
    return value


@pytest.fixture(autouse=True)
def _clean_state(redis_db: RedisDb) -> Iterator[None]:
    """Every test starts with empty tables, an empty Redis index, no stored objects, and
    the dispatch mode undecided (`cli poll` pins its process to run tasks in-process)."""
    yield
    from backend import dispatch
    from backend.db import get_engine
    from backend.mailbox import budget, pool
    from backend.models import Base
    from backend.processing import progress

    dispatch.reset()
    progress.forget()  # a test's successes are no evidence for the next one's failures
    pool.clear()  # ids restart: a kept session must not meet a later test's account
    budget.reset()  # a local-mode budget's slots and throttles are this process's

    engine = get_engine()
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    redis_db.client().flushdb()
    shutil.rmtree(Path(str(_state["data_dir"])) / "storage", ignore_errors=True)


@pytest.fixture
def db() -> Iterator[Session]:
    """A session for arranging and checking; the test commits what it arranges."""
    from backend.db import get_sessionmaker

    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def set_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Change settings for one test: set_env(S3_BUCKET="b", IMAP_CA_BUNDLE=None)."""

    def _set(**values: object) -> None:
        for name, value in values.items():
            if value is None:
                monkeypatch.delenv(name.upper(), raising=False)
            else:
                monkeypatch.setenv(name.upper(), str(value))
        reset_caches()

    yield _set
    monkeypatch.undo()
    reset_caches()


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    server = Dovecot(Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-")))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def cyrus() -> Iterator[Cyrus]:
    server = Cyrus(Path(tempfile.mkdtemp(prefix="mailbeat-cyrus-")))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def mail_server(request: pytest.FixtureRequest) -> RealServer:
    """The Dovecot fixture; for a test marked `on_both_servers` (tests/support/servers.py)
    the Cyrus fixture too."""
    server: RealServer = request.getfixturevalue(getattr(request, "param", "dovecot"))
    return server


@pytest.fixture
def mail_user(mail_server: RealServer) -> tuple[str, str]:
    """A new, empty mailbox on `mail_server`: (username, password)."""
    username = f"user-{uuid.uuid4().hex[:10]}"
    return username, mail_server.add_user(username, f"pw-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def mail_account(db: Session, mail_server: RealServer, mail_user: tuple[str, str]) -> MailAccount:
    """Accounts for `mail_user`'s mailbox on `mail_server`: mail_account(**columns)."""

    def make(**overrides: Any) -> Account:
        return make_account(db, mail_server, **{"username": mail_user[0], **overrides})

    return make


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server = MotoS3()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3, set_env: Callable[..., None]) -> str:
    """A fresh bucket on the moto server, with the S3 settings pointing at it."""
    bucket = f"mailbeat-{uuid.uuid4().hex[:10]}"
    moto_s3.create_bucket(bucket)
    set_env(
        S3_ENDPOINT_URL=moto_s3.endpoint_url,
        S3_BUCKET=bucket,
        S3_REGION=REGION,
        S3_ACCESS_KEY_ID=ACCESS_KEY,
        S3_SECRET_ACCESS_KEY=SECRET_KEY,
        S3_ADDRESSING_STYLE="path",
    )
    return bucket


@pytest.fixture
def s3_outage(moto_s3: MotoS3, s3_bucket: str) -> Iterator[Outage]:
    """S3 can be stopped mid-test; it is back (with an empty bucket) after the test."""
    outage = Outage(moto_s3, s3_bucket)
    yield outage
    outage.end()
