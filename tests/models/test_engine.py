"""backend.db's engine: a pooled connection is pinged before it is used only when it has
been idle, and one the server dropped meanwhile is replaced, not handed out."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from backend import db
from backend.db import build_engine
from tests.support import postgres


@pytest.fixture
def url() -> Iterator[str]:
    url = postgres.create_database("mailbeat_engine")
    yield url
    postgres.drop_database(url)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = build_engine(url)
    yield engine
    engine.dispose()


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_used_just_now_is_not_pinged_and_an_idle_one_is(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pinged: list[object] = []
    ping = engine.dialect.do_ping

    def counted(dbapi_connection: object) -> bool:
        pinged.append(dbapi_connection)
        return ping(dbapi_connection)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    pids = {backend_pid(engine) for _ in range(5)}
    assert len(pids) == 1 and pinged == []

    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)  # as if it had been idle a while
    assert backend_pid(engine) in pids
    assert len(pinged) == 1


def test_an_idle_connection_the_server_dropped_is_replaced_before_it_is_used(
    url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = backend_pid(engine)
    other = build_engine(url)
    try:
        with other.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped})
    finally:
        other.dispose()
    monkeypatch.setattr(db, "PING_IDLE_SECONDS", 0.0)
    # The transaction gets a live connection; the dead one never reaches it.
    assert backend_pid(engine) != dropped
