"""The models and the migrations agree, on PostgreSQL and on SQLite, both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

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
