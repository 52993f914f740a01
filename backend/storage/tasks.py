from __future__ import annotations

import logging

from backend.celery_app import app
from backend.db import session_scope
from backend.storage.service import SyncProgress, purge_deleted_accounts, sync_fallback_objects

log = logging.getLogger(__name__)


def sync_all() -> dict[str, int]:
    """Move every fallback object up to S3, committing after each batch so a run cut
    short keeps what it did. Plain, so a process without Celery can run it too."""
    progress = SyncProgress()
    while not progress.done:
        with session_scope() as session:
            sync_fallback_objects(session, progress)
    counts = progress.as_dict()
    if any(counts.values()):
        log.info("storage sync: %s", counts)
    return counts


def purge_deleted() -> int:
    """Deleted accounts' objects that their deletion could not remove (storage down, a
    crash, a poll still running)."""
    with session_scope() as session:
        return purge_deleted_accounts(session)


@app.task(name="storage.sync")
def sync() -> dict[str, int]:
    purge_deleted()
    return sync_all()
