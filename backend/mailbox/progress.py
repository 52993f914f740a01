"""How far a poll has come, folder by folder: done and total of the messages it set out to
fetch. Written to `Account.sync_progress` in each batch's own transaction (so the API and
the console see a first sync fill up; a folder's start goes with its first batch, or with
the poll's last transaction when it stores none), and handed to an optional callback (the
Celery task's PROGRESS state, the CLI's progress bar).

A sync that stopped half-way (a time limit, a lost connection) is taken up by the next
poll: its total becomes what was done plus what is left, and done goes on from there.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

Progress = dict[str, dict[str, int]]
OnProgress = Callable[[Progress], None]


class SyncProgress:
    def __init__(self, stored: Progress | None, on_progress: OnProgress | None = None) -> None:
        self.folders: Progress = deepcopy(stored) if stored else {}
        self.on_progress = on_progress
        # A start not yet in any transaction's values (`advance`, `unwritten`).
        self.started = False

    def start(self, folder: str, count: int) -> None:
        """A folder's sync sets out to fetch `count` messages (written with the next
        values asked for: no transaction of its own)."""
        before = self.folders.get(folder)
        # An unfinished sync is taken up again; a finished one starts a new count.
        unfinished = before is not None and before["done"] < before["total"]
        done = before["done"] if before is not None and unfinished else 0
        self.folders[folder] = {"done": done, "total": done + count}
        self.started = True
        self._snapshot()

    def advance(self, folder: str, count: int) -> dict[str, Progress]:
        """`count` more messages of the folder were handled: the account's values to
        write in the transaction that stores them (the batch's own update of the
        account row carries them); none when the folder's sync is not tracked (a
        backfill stores outside the poll)."""
        entry = self.folders.get(folder)
        if entry is None:
            return {}
        entry["done"] = min(entry["total"], entry["done"] + count)
        self.started = False
        return {"sync_progress": self._snapshot()}

    def unwritten(self) -> dict[str, Progress]:
        """The account's values for the poll's last transaction: the progress, when a
        folder's start has not been written by a batch (it stored nothing)."""
        if not self.started:
            return {}
        self.started = False
        return {"sync_progress": deepcopy(self.folders)}

    def _snapshot(self) -> Progress:
        snapshot = deepcopy(self.folders)
        if self.on_progress is not None:
            self.on_progress(snapshot)
        return snapshot
