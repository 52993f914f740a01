"""backend.db.bulk_insert on both databases: unnest on PostgreSQL, executemany on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, select
from sqlalchemy.orm import Session

from backend.db import build_engine, bulk_insert
from backend.models import Attachment, Base, Message, StorageBackend
from tests.support import postgres
from tests.support.accounts import make_account

MESSAGES = cast(Table, Message.__table__)
ATTACHMENTS = cast(Table, Attachment.__table__)
KEY = ("account_id", "folder", "uidvalidity", "uid")


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = postgres.create_database("mailbeat_bulk")
    else:
        url = f"sqlite:///{tmp_path}/bulk.db"
    engine = build_engine(url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
    if request.param == "postgresql":
        postgres.drop_database(url)


def row(account_id: int, uid: int, **values: Any) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "folder": "Übersicht/2026",
        "uidvalidity": 7,
        "uid": uid,
        "subject": None,
        "to_addrs": [],
        "cc_addrs": [],
        "flags": ["\\Seen"],
        "date": None,
        "size": uid * 10,
        "storage_backend": StorageBackend.LOCAL,
        "ingested_at": datetime(2026, 11, 29, 20, 0, tzinfo=UTC),
        **values,
    }


def test_rows_round_trip_and_a_held_key_is_skipped(engine: Engine) -> None:
    with Session(engine) as session:
        account = make_account(session)
        first = [
            row(
                account.id,
                1,
                subject="Grüße — 東京 'quoted' \"and\" {braces}, commas\\",
                to_addrs=["Zoë <zoe@example.org>", "b@example.org"],
                date=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            ),
            row(account.id, 2, flags=[]),
        ]
        inserted = bulk_insert(session, MESSAGES, first, unique=KEY, returning=("id", "uid"))
        assert sorted(r.uid for r in inserted) == [1, 2]
        again = bulk_insert(
            session,
            MESSAGES,
            [row(account.id, 2, subject="second copy"), row(account.id, 3)],
            unique=KEY,
            returning=("id", "uid"),
        )
        assert [r.uid for r in again] == [3]  # uid 2 is held: skipped
        ids = {r.uid: r.id for r in [*inserted, *again]}
        bulk_insert(
            session,
            ATTACHMENTS,
            [
                {
                    "message_id": ids[1],
                    "filename": None,
                    "safe_name": "a.pdf",
                    "content_type": "application/pdf",
                    "content_id": None,
                    "size": 3,
                    "content_hash": "0" * 64,
                    "storage_backend": StorageBackend.S3,
                    "storage_key": "k",
                }
            ],
        )
        assert bulk_insert(session, ATTACHMENTS, []) == []
        session.commit()

        held = {m.uid: m for m in session.scalars(select(Message))}
        assert held[1].subject == first[0]["subject"]
        assert held[1].to_addrs == first[0]["to_addrs"]
        assert held[1].flags == ["\\Seen"]
        assert held[1].date == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert held[1].storage_backend == StorageBackend.LOCAL
        assert held[2].subject is None  # the first copy stays
        assert held[2].flags == []
        assert held[2].date is None
        assert held[3].size == 30
        (attachment,) = session.scalars(select(Attachment))
        assert attachment.message_id == ids[1]
        assert attachment.storage_backend == StorageBackend.S3
