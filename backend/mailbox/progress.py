"""How far a poll has come, folder by folder: done and total of the messages it set out to
fetch. Written to `Account.sync_progress` in each batch's own transaction (so the API and
the console see a first sync fill up), and handed to an optional callback (the Celery
task's PROGRESS state, the CLI's progress bar).

A sync that stopped half-way (a time limit, a lost connection) is taken up by the next
poll: its total becomes what was done plus what is left, and done goes on from there.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.models import Account

Progress = dict[str, dict[str, int]]
OnProgress = Callable[[Progress], None]


class SyncProgress:
    def __init__(
        self, account_id: int, stored: Progress | None, on_progress: OnProgress | None = None
    ) -> None:
        self.account_id = account_id
        self.folders: Progress = deepcopy(stored) if stored else {}
        self.on_progress = on_progress

    def start(self, session: Session, folder: str, count: int) -> None:
        """A folder's sync sets out to fetch `count` messages."""
        before = self.folders.get(folder)
        # An unfinished sync is taken up again; a finished one starts a new count.
        unfinished = before is not None and before["done"] < before["total"]
        done = before["done"] if before is not None and unfinished else 0
        self.folders[folder] = {"done": done, "total": done + count}
        self._write(session)

    def advance(self, folder: str, count: int) -> dict[str, Progress]:
        """`count` more messages of the folder were handled: the account's values to
        write in the transaction that stores them (the batch's own update of the
        account row carries them); none when the folder's sync is not tracked (a
        backfill stores outside the poll)."""
        entry = self.folders.get(folder)
        if entry is None:
            return {}
        entry["done"] = min(entry["total"], entry["done"] + count)
        return {"sync_progress": self._snapshot()}

    def _write(self, session: Session) -> None:
        session.execute(
            update(Account)
            .where(Account.id == self.account_id)
            .values(sync_progress=self._snapshot())
        )

    def _snapshot(self) -> Progress:
        snapshot = deepcopy(self.folders)
        if self.on_progress is not None:
            self.on_progress(snapshot)
        return snapshot
