"""What a watcher records in the database (backend/push/service.py)."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import insert
from sqlalchemy.orm import Session

from backend.db import get_engine
from backend.models import Account, Message, utcnow
from backend.push import service
from tests.support.accounts import make_account


def test_a_selected_folder_waits_for_a_batch_in_flight_only_to_change_something(
    db: Session,
) -> None:
    """A poll's batch holds the account row's share lock through its writes (its rows'
    foreign keys): a watcher that selects a folder with nothing to change does not wait
    for it; one whose folder polls wait to try again does, then makes them try now."""
    account = make_account(db)
    later = (utcnow() + timedelta(hours=1)).isoformat()
    account.folder_errors = {"Gone": {"error": "no such folder", "retry_at": later}}
    db.commit()

    def selected(folder: str) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            service.folder_selected(account.id, folder)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        return done

    with get_engine().connect() as batch:
        batch.execute(
            insert(Message).values(account_id=account.id, folder="INBOX", uidvalidity=1, uid=1)
        )
        assert selected("INBOX").wait(10), "it waited for the batch with nothing to change"
        gone = selected("Gone")
        assert not gone.wait(1)  # it has something to change: after the batch
        batch.rollback()
    assert gone.wait(10)
    db.expire_all()
    refreshed = db.get(Account, account.id)
    assert refreshed is not None and refreshed.folder_errors is not None
    assert refreshed.folder_errors["Gone"]["retry_at"] < later
