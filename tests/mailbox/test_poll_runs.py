"""Poll-run retention: finished runs older than POLL_RUN_RETENTION_DAYS go, in chunks,
oldest first; runs still going stay."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.polling import PRUNE_TASK, prune_poll_runs
from backend.models import PollOutcome, PollRun, utcnow
from tests.support.accounts import make_account


def _runs(db: Session, days_ago: list[float | None]) -> list[int]:
    """A run per entry: finished that many days ago, or (None) started 30 days ago and
    still running. Returns their ids."""
    account = make_account(db)
    now = utcnow()
    runs = [
        PollRun(
            account_id=account.id,
            started_at=now - timedelta(days=30 if days is None else days, seconds=5),
            finished_at=None if days is None else now - timedelta(days=days),
            outcome=PollOutcome.RUNNING if days is None else PollOutcome.SUCCESS,
        )
        for days in days_ago
    ]
    db.add_all(runs)
    db.commit()
    return [run.id for run in runs]


def _left(db: Session) -> list[int]:
    db.expire_all()
    return list(db.scalars(select(PollRun.id).order_by(PollRun.id)))


def test_finished_runs_past_the_retention_go_in_chunks(
    db: Session, set_env: Callable[..., None]
) -> None:
    set_env(POLL_RUN_RETENTION_DAYS=14)
    ids = _runs(db, [20, 15, 14.01, 30, 40, 13.9, 1, None])
    assert prune_poll_runs(chunk=2) == 5
    # Kept: finished less than 14 days ago, and the run still going.
    assert _left(db) == [ids[5], ids[6], ids[7]]
    assert prune_poll_runs(chunk=2) == 0


def test_a_prune_stops_after_its_chunks_and_takes_the_oldest_first(
    db: Session, set_env: Callable[..., None]
) -> None:
    set_env(POLL_RUN_RETENTION_DAYS=7)
    ids = _runs(db, [8, 40, 9, 30, 2])
    assert prune_poll_runs(chunk=2, max_chunks=1) == 2
    assert _left(db) == [ids[0], ids[2], ids[4]]  # the 40- and 30-day-old ones went
    assert prune_poll_runs(chunk=2, max_chunks=1) == 2
    assert _left(db) == [ids[4]]


def test_the_task_is_registered_and_scheduled() -> None:
    from backend.celery_app import PRUNE_SECONDS, app

    app.loader.import_default_modules()
    assert PRUNE_TASK in app.tasks
    entry = app.conf.beat_schedule["poll-runs-prune"]
    assert entry["task"] == PRUNE_TASK
    assert entry["schedule"] == PRUNE_SECONDS
    # Not on the polls' queue: the processors take it.
    assert app.amqp.router.route({}, PRUNE_TASK)["queue"].name == "default"


def test_local_mode_prunes_with_its_housekeeping(db: Session, set_env: Callable[..., None]) -> None:
    from backend.main import local_housekeeping

    set_env(POLL_RUN_RETENTION_DAYS=1)
    ids = _runs(db, [2, 0.5])
    local_housekeeping()
    assert _left(db) == [ids[1]]
