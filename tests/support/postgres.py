"""A fresh PostgreSQL database per test session; the suite never touches another one."""

from __future__ import annotations

import os
import uuid

import psycopg
from psycopg import sql

ADMIN_DSN = os.environ.get(
    "MAILBEAT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def create_database(prefix: str = "mailbeat_test") -> str:
    """Create an empty database and return its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    assert name.startswith("mailbeat_"), f"refusing to drop {name}"
    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
