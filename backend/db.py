"""Engine and sessions. Services only flush; the request or task boundary commits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    Engine,
    Integer,
    Row,
    Table,
    TypeDecorator,
    cast,
    create_engine,
    event,
    func,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from backend.config import get_settings


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Cascades need foreign keys on; WAL lets the API read while a poll writes.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def build_engine(url: str) -> Engine:
    """Errors never show a statement's parameters: they are subjects, addresses and
    bodies, and error texts end up in last_error, PollRun rows and the log."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            hide_parameters=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    settings = get_settings()
    engine = create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size * 2,
        connect_args={"connect_timeout": 10},
        hide_parameters=True,
    )
    _ping_when_idle(engine)
    return engine


# A pooled connection idle this long is pinged before it is used again (the database
# restarted, a proxy dropped it); one used since is not. A ping at every checkout (the
# pool's pre_ping) was a round trip per transaction: six a poll (docs/benchmarks.md).
PING_IDLE_SECONDS = 2.0


def _ping_when_idle(engine: Engine) -> None:
    def used(_dbapi_connection: Any, record: Any) -> None:
        record.info["used_at"] = time.monotonic()

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used_at", 0.0) < PING_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # Dead, and the others as old are too (a restart): the pool opens new ones.
            raise InvalidatePoolError(f"a pooled connection did not answer: {exc}") from exc

    event.listen(engine, "connect", used)
    event.listen(engine, "checkin", used)
    event.listen(engine, "checkout", checkout)


@lru_cache
def get_engine() -> Engine:
    return build_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A task boundary: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def epoch(session: Session, column: Any) -> ColumnElement[Any]:
    """A timestamp in epoch seconds, in SQL, for the session's database."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), Integer)
    return func.extract("epoch", column)


def insert_for(session: Session, table: type[Any] | Table) -> Any:
    """INSERT that can take ON CONFLICT, for the session's database (PostgreSQL or SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def bulk_insert(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    unique: Sequence[str] = (),
    returning: Sequence[str] = (),
    any_conflict: bool = False,
) -> list[Row[Any]]:
    """Insert rows in one statement; each row has the same keys, with a value for every
    column that needs one (Python-side column defaults do not apply). With `unique`, rows that
    would break that unique key are skipped (ON CONFLICT DO NOTHING); with `any_conflict`,
    rows that would break any unique index of the table. Returns the
    `returning` columns of the rows inserted, in no particular order.

    PostgreSQL gets one `INSERT .. SELECT FROM unnest(array, ...)` with one array
    parameter per column: one statement of fixed text whatever the number of rows, so
    nothing is built or split per row (an executemany of a 50-row batch spends its time
    formatting and splitting multi-row VALUES). The arrays go in binary (`%b`): as text
    every element is searched and escaped for quotes, 40 times the CPU for a batch of
    message bodies (docs/benchmarks.md). Elsewhere (SQLite) an executemany."""
    if not rows:
        return []
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name != "postgresql":
        statement = insert_for(session, table)
        if any_conflict:
            statement = statement.on_conflict_do_nothing()
        elif unique:
            statement = statement.on_conflict_do_nothing(index_elements=list(unique))
        if returning:
            statement = statement.returning(*(table.c[name] for name in returning))
        result = connection.execute(statement, list(rows))
        return list(result) if returning else []
    names = list(rows[0])
    arrays: dict[str, list[Any]] = {}
    casts: list[str] = []
    selects: list[str] = []
    for name in names:
        column = table.c[name]
        kind = column.type
        if isinstance(kind, JSON):
            # Arrays of json text, read back as json column by column.
            arrays[name] = [None if row[name] is None else json.dumps(row[name]) for row in rows]
            casts.append(f"%({name})b::text[]")
            selects.append(f"t.{name}::json")
            continue
        if isinstance(kind, TypeDecorator):
            arrays[name] = [kind.process_bind_param(row[name], dialect) for row in rows]
            kind = kind.impl_instance
        else:
            arrays[name] = [row[name] for row in rows]
        casts.append(f"%({name})b::{kind.compile(dialect=dialect)}[]")
        selects.append(f"t.{name}")
    # Names come from the Table (known column names, checked by table.c above); every
    # value is a parameter.
    sql = (
        f"INSERT INTO {table.name} ({', '.join(names)}) "  # noqa: S608 - see above
        f"SELECT {', '.join(selects)} FROM unnest({', '.join(casts)}) AS t({', '.join(names)})"
    )
    if any_conflict:
        sql += " ON CONFLICT DO NOTHING"
    elif unique:
        sql += f" ON CONFLICT ({', '.join(unique)}) DO NOTHING"
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    result = connection.exec_driver_sql(sql, arrays)
    return list(result) if returning else []


class DatabaseUnavailable(RuntimeError):
    """The database cannot be used; the message says why and what to do."""


def check_database() -> None:
    """Connect once, and turn the driver's error into a sentence with the fix (a missing
    PostgreSQL database used to be a 131-line traceback)."""
    try:
        with get_engine().connect():
            pass
    except OperationalError as exc:
        raise DatabaseUnavailable(
            describe_failure(make_url(get_settings().database_url), exc)
        ) from exc


def describe_failure(url: URL, exc: OperationalError) -> str:
    reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else repr(exc.orig)
    if url.get_backend_name() == "sqlite":
        return f"the SQLite database {url.database} cannot be opened: {reason}"
    host, port = url.host or "localhost", url.port or 5432
    where = f"PostgreSQL at {host}:{port}"
    if url.database and f'database "{url.database}" does not exist' in reason:
        user = f" -U {url.username}" if url.username else ""
        return (
            f'{where} has no database "{url.database}" (DATABASE_URL). Create it with:\n'
            f"    createdb -h {host} -p {port}{user} {url.database}\n"
            "then start again; the tables are created by the migration at start."
        )
    if "Connection refused" in reason or "could not connect" in reason:
        return (
            f"{where} does not answer ({reason}). Start PostgreSQL, or fix DATABASE_URL "
            "(leave it unset to use SQLite under DATA_DIR)."
        )
    return f"{where} refused the connection: {reason}. Check DATABASE_URL."


def reset_caches() -> None:
    """Forget the cached settings, engine and sessionmaker (tests change the environment)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_sessionmaker.cache_clear()
    get_engine.cache_clear()
    get_settings.cache_clear()
