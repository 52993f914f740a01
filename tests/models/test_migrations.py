"""The models and the migrations agree, on PostgreSQL and on SQLite, both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from backend import crypto
from backend.db import build_engine
from backend.models import Base
from tests.support import postgres

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


@pytest.fixture(params=["postgresql", "sqlite"])
def scratch_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = postgres.create_database("mailbeat_migr")
    else:
        url = f"sqlite:///{tmp_path}/migrations.db"
    engine = build_engine(url)
    yield engine
    engine.dispose()
    if request.param == "postgresql":
        postgres.drop_database(url)


def _run(engine: Engine, action: str, target: str) -> None:
    config = Config(str(ALEMBIC_INI))
    config.attributes["configure_logger"] = False
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, target)


def _diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        return list(compare_metadata(context, Base.metadata))


def test_upgrade_matches_models_and_round_trips(scratch_engine: Engine) -> None:
    _run(scratch_engine, "upgrade", "head")
    assert _diff(scratch_engine) == []
    tables = set(inspect(scratch_engine).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables

    _run(scratch_engine, "downgrade", "base")
    assert set(inspect(scratch_engine).get_table_names()) <= {"alembic_version"}

    _run(scratch_engine, "upgrade", "head")
    assert _diff(scratch_engine) == []


def test_sqlite_never_reuses_ids_and_the_upgrade_keeps_the_rows(tmp_path: Path) -> None:
    engine = build_engine(f"sqlite:///{tmp_path}/ids.db")
    try:
        _run(engine, "upgrade", "0001")
        with engine.begin() as connection:
            for n in (1, 2):
                connection.execute(
                    text(
                        "INSERT INTO accounts (email, imap_host, imap_port, imap_security, "
                        "username, auth_method, credentials_encrypted, folders, "
                        "poll_interval_seconds, enabled, initial_sync, status, "
                        "consecutive_failures, message_count, created_at, updated_at) VALUES "
                        f"('a{n}@x', 'h', 993, 'ssl', 'u{n}', 'password', 'c', '[]', 60, 1, "
                        "'all', 'active', 0, 0, '2026-01-01', '2026-01-01')"
                    )
                )
            connection.execute(
                text(
                    "INSERT INTO messages (account_id, folder, uidvalidity, uid, to_addrs, "
                    "cc_addrs, flags, size, ingested_at) "
                    "VALUES (2, 'INBOX', 1, 1, '[]', '[]', '[]', 1, '2026-01-01')"
                )
            )
        _run(engine, "upgrade", "head")
        engine.dispose()  # fresh connections (foreign keys on), as the app's
        with engine.begin() as connection:
            # The upgrade kept every row (the rebuild did not cascade).
            assert connection.execute(text("SELECT count(*) FROM messages")).scalar() == 1
            connection.execute(text("DELETE FROM accounts WHERE id = 2"))  # the highest id
            connection.execute(
                text(
                    "INSERT INTO accounts (email, imap_host, imap_port, imap_security, "
                    "username, auth_method, credentials_encrypted, folders, "
                    "poll_interval_seconds, enabled, initial_sync, status, "
                    "consecutive_failures, message_count, created_at, updated_at) VALUES "
                    "('a3@x', 'h', 993, 'ssl', 'u3', 'password', 'c', '[]', 60, 1, "
                    "'all', 'active', 0, 0, '2026-01-01', '2026-01-01')"
                )
            )
            ids = connection.execute(text("SELECT id FROM accounts ORDER BY id")).scalars()
            assert list(ids) == [1, 3]
            assert connection.execute(text("SELECT count(*) FROM messages")).scalar() == 0
    finally:
        engine.dispose()


def _body_compression(engine: Engine) -> dict[str, str]:
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT attname, attcompression FROM pg_attribute WHERE attrelid = "
                "'messages'::regclass AND attname IN ('text_body', 'html_body')"
            )
        )
        return {name: method for name, method in rows}


def test_postgresql_compresses_message_bodies_with_lz4() -> None:
    """This machine's PostgreSQL is built with lz4 (Debian's is): the bodies use it
    after the upgrade, and the default again after the downgrade."""
    url = postgres.create_database("mailbeat_migr")
    engine = build_engine(url)
    try:
        _run(engine, "upgrade", "head")
        assert _body_compression(engine) == {"text_body": "l", "html_body": "l"}
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO accounts (email, imap_host, imap_port, imap_security, "
                    "username, auth_method, credentials_encrypted, folders, "
                    "poll_interval_seconds, enabled, initial_sync, status, priority, "
                    "consecutive_failures, message_count, push, created_at, updated_at) "
                    "VALUES ('a@x', 'h', 993, 'ssl', 'u', 'password', 'c', '[]', 60, true, "
                    "'all', 'active', 0, 0, 0, false, now(), now())"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO messages (account_id, folder, uidvalidity, uid, to_addrs, "
                    "cc_addrs, flags, size, ingested_at, text_body) VALUES (1, 'INBOX', 1, "
                    "1, '[]', '[]', '[]', 1, now(), repeat('compressible text ', 2000))"
                )
            )
            stored = connection.execute(
                text("SELECT pg_column_compression(text_body) FROM messages")
            ).scalar()
        assert stored == "lz4"
        _run(engine, "downgrade", "0009_backfills")
        assert _body_compression(engine) == {"text_body": "", "html_body": ""}
    finally:
        engine.dispose()
        postgres.drop_database(url)


def test_0014_encrypts_the_userinfo_of_stored_webhook_urls(scratch_engine: Engine) -> None:
    secret_url = "https://hookuser:basic-PASS@hooks.example.org/in?x=1"
    _run(scratch_engine, "upgrade", "0010_message_bodies_lz4")
    with scratch_engine.begin() as connection:
        for n, url in ((1, secret_url), (2, "https://hooks.example.org/plain")):
            connection.execute(
                text(
                    "INSERT INTO accounts (email, imap_host, imap_port, imap_security, "
                    "username, auth_method, credentials_encrypted, folders, "
                    "poll_interval_seconds, enabled, initial_sync, status, "
                    "consecutive_failures, message_count, created_at, updated_at, "
                    "webhook_url) VALUES "
                    f"('a{n}@x', 'h', 993, 'ssl', 'u{n}', 'password', 'c', '[]', 60, true, "
                    "'all', 'active', 0, 0, '2026-01-01', '2026-01-01', :url)"
                ),
                {"url": url},
            )
        connection.execute(
            text(
                "INSERT INTO webhook_deliveries (event_id, event_type, dedupe_key, target, "
                "account_id, url, status, attempts, next_attempt_at, created_at) VALUES "
                "('evt_1', 'message.received', 'k', 'account', 1, :url, 'dead', 1, "
                "'2026-01-01', '2026-01-01')"
            ),
            {"url": secret_url},
        )

    _run(scratch_engine, "upgrade", "head")

    with scratch_engine.connect() as connection:
        rows = connection.execute(
            text("SELECT webhook_url, webhook_userinfo_encrypted FROM accounts ORDER BY id")
        ).all()
        delivered = connection.execute(text("SELECT url FROM webhook_deliveries")).scalar()
    assert rows[0][0] == "https://***@hooks.example.org/in?x=1"
    assert crypto.decrypt(rows[0][1]) == "hookuser:basic-PASS"
    assert rows[1] == ("https://hooks.example.org/plain", None)
    assert delivered == "https://***@hooks.example.org/in?x=1"

    _run(scratch_engine, "downgrade", "0010_message_bodies_lz4")
    with scratch_engine.connect() as connection:
        urls = connection.execute(text("SELECT webhook_url FROM accounts ORDER BY id")).scalars()
        assert list(urls) == [secret_url, "https://hooks.example.org/plain"]


def test_0019_quarantines_the_processing_dead_letters_already_there(
    scratch_engine: Engine,
) -> None:
    _run(scratch_engine, "upgrade", "0018_message_threads_labels")
    with scratch_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO accounts (email, imap_host, imap_port, imap_security, "
                "username, auth_method, credentials_encrypted, folders, "
                "poll_interval_seconds, enabled, initial_sync, status, "
                "consecutive_failures, message_count, created_at, updated_at) VALUES "
                "('a@x', 'h', 993, 'ssl', 'u', 'password', 'c', '[]', 60, true, "
                "'all', 'active', 0, 0, '2026-01-01', '2026-01-01')"
            )
        )
        # Given up on (10 failures), still being retried (3), and processed after failures.
        for uid, failures, processed in ((1, 10, None), (2, 3, None), (3, 10, "2026-01-02")):
            connection.execute(
                text(
                    "INSERT INTO messages (account_id, folder, uidvalidity, uid, to_addrs, "
                    "cc_addrs, flags, size, ingested_at, process_failures, processed_at) "
                    "VALUES (1, 'INBOX', 1, :uid, '[]', '[]', '[]', 1, '2026-01-01', "
                    ":failures, :processed)"
                ),
                {"uid": uid, "failures": failures, "processed": processed},
            )

    _run(scratch_engine, "upgrade", "head")

    with scratch_engine.connect() as connection:
        quarantined = connection.execute(
            text("SELECT uid FROM messages WHERE quarantined_at IS NOT NULL")
        ).scalars()
        assert list(quarantined) == [1]
    _run(scratch_engine, "downgrade", "0018_message_threads_labels")
