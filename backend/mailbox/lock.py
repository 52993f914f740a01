"""One poll per mailbox at a time, across every worker: a Redis lock per mailbox.

redis-py's Lock: the key holds a random token and expires on its own a while after the
poll's hard time limit, so a worker killed mid-poll cannot keep a mailbox locked for
ever, while a poll that is still legitimately running never loses its lock. Only the
holder releases it (a compare-and-delete in one Lua script), so a poll that outlived
its lock cannot delete the lock a later poll took.

A poll that finds the mailbox held may have been sent for news the holder has already
looked past (new mail pushed, a poll asked for by hand): it leaves a rerun request, which
the holder takes as it lets go and answers with one more poll.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from backend import redis
from backend.config import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "mailbeat:lock:mailbox:"
RERUN_PREFIX = "mailbeat:rerun:mailbox:"
# How long the lock outlives the poll's hard time limit (the worker kills the poll then).
EXPIRY_MARGIN_SECONDS = 30


def lock_key(account_id: int) -> str:
    return f"{KEY_PREFIX}{account_id}"


def rerun_key(account_id: int) -> str:
    return f"{RERUN_PREFIX}{account_id}"


def expiry_seconds() -> int:
    return get_settings().poll_time_limit_seconds + EXPIRY_MARGIN_SECONDS


class MailboxLock:
    def __init__(self, account_id: int, *, expiry: int | None = None) -> None:
        self.key = lock_key(account_id)
        self.expiry = expiry if expiry is not None else expiry_seconds()
        self.token = secrets.token_hex(16)
        self._lock = redis.lock(redis.shared(), self.key, self.expiry)

    def acquire(self) -> bool:
        return bool(self._lock.acquire(token=self.token))

    def release(self) -> bool:
        """Delete the lock if this holder still has it; False if it had expired or passed
        to another poll (which keeps it)."""
        try:
            self._lock.release()
        except redis.LockError:
            return False
        return True


@contextmanager
def mailbox_lock(account_id: int) -> Iterator[bool]:
    """`with mailbox_lock(id) as held:` — held is False when another poll has the mailbox."""
    lock = MailboxLock(account_id)
    held = lock.acquire()
    if not held:
        # Asked before trying again: either the holder takes the request as it lets go,
        # or it has let go already and this poll gets the mailbox.
        redis.shared().set(rerun_key(account_id), 1, ex=lock.expiry)
        held = lock.acquire()
        if held:  # this poll looks after every request made so far
            redis.shared().delete(rerun_key(account_id))
    try:
        yield held
    finally:
        if held and not lock.release():
            log.warning("lock of mailbox %s had expired before the poll ended", account_id)


def rerun_requested(account_id: int) -> bool:
    """Whether a poll found the mailbox held by the one now letting go of it; the request
    is taken (one rerun answers any number of them). Call after the lock is released."""
    return bool(redis.shared().getdel(rerun_key(account_id)))
