"""One poll per mailbox at a time, across every worker: a lease on the mailbox that lives
only as long as its poll.

The lease is a fenced lease in Redis (backend/leases.py): `mailbeat:lock:mailbox:{id}`,
taken with SET NX, lasting MAILBOX_LEASE_SECONDS, and renewed every third of that by a
heartbeat thread of the polling process for as long as the poll runs. A thread rather
than a renewal at each batch: a single FETCH of a large batch from a slow server can
take longer than the lease, and the thread renews while the poll's own threads wait on
the socket. A poll of any length keeps its mailbox; a poll whose process died (SIGKILL,
out of memory, a lost host) stops renewing, and its mailbox is free within the lease.

A lease alone does not make a poll the only writer: a process stopped past its lease
(SIGSTOP, a long GC pause, a network partition) wakes up believing it still polls. So
the poll's writes are fenced in the database, not in Redis (backend/mailbox/cursors.py,
`take_fence` / `hold_fence`): each poll that takes the lease also takes the next fencing
token of the account's row, and every batch commits only while the row still carries
that token, checked and row-locked in the batch's own transaction. A newer poll's token
therefore ends the older one's writes at once, atomically with the commit, however long
the older one slept and whatever Redis did meanwhile; a fence kept in Redis would be
checked a round trip before the commit (a stall between the two still lets it through)
and its counter can go back on a failover, which would fence out every later poll. The
heartbeat's finding that the lease was lost (`lost`) only ends the poll sooner.

A poll that finds the mailbox held may have been sent for news the holder has already
looked past (new mail pushed, a poll asked for by hand): it leaves a rerun request, which
the holder takes as it lets go and answers with one more poll. The request lasts a
lease and the holder's heartbeat extends it, so a dead holder's request goes with it
(the sweep of dead polls, backend/mailbox/polling.py, sends that poll instead).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from backend import leases as fenced
from backend import redis
from backend.config import get_settings

log = logging.getLogger(__name__)

KEY_PREFIX = "mailbeat:lock:mailbox:"
FENCE_PREFIX = "mailbeat:lock:fence:"
RERUN_PREFIX = "mailbeat:rerun:mailbox:"
# Renewals per lease: a renewal may be late or fail twice before the lease is lost.
RENEWALS_PER_LEASE = 3


def lock_key(account_id: int) -> str:
    return f"{KEY_PREFIX}{account_id}"


def rerun_key(account_id: int) -> str:
    return f"{RERUN_PREFIX}{account_id}"


def lease_seconds() -> float:
    return get_settings().mailbox_lease_seconds


class MailboxLock:
    """One poll's lease on a mailbox: `acquire`, then `release` (whichever thread)."""

    def __init__(self, account_id: int, *, seconds: float | None = None) -> None:
        self.account_id = account_id
        self.key = lock_key(account_id)
        self.seconds = seconds if seconds is not None else lease_seconds()
        self._leases = fenced.Leases(
            secrets.token_hex(8), self.seconds, lease_prefix=KEY_PREFIX, fence_prefix=FENCE_PREFIX
        )
        self.milliseconds = self._leases.milliseconds
        self.value: str | None = None
        # Set by the heartbeat once the lease is found taken by another poll, or expired.
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> bool:
        self.value = self._leases.claim([self.account_id]).get(self.account_id)
        if self.value is None:
            return False
        self._heartbeat = threading.Thread(
            target=self._beat, name=f"mailbox-lease-{self.account_id}", daemon=True
        )
        self._heartbeat.start()
        return True

    def release(self) -> bool:
        """Stop renewing and delete the lease if this poll still has it; False if it had
        expired or passed to another poll (which keeps it)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.value is None:
            return False
        return self._leases.release(self.account_id, self.value) and not self.lost.is_set()

    def _beat(self) -> None:
        assert self.value is not None
        while not self._stop.wait(self.seconds / RENEWALS_PER_LEASE):
            try:
                lost = self._leases.renew({self.account_id: self.value})
                redis.shared().pexpire(rerun_key(self.account_id), self.milliseconds)
            except redis.RedisError:
                # The lease may run out meanwhile; the database fence keeps a successor
                # and this poll from both writing.
                log.warning("lease of mailbox %s not renewed: Redis failed", self.account_id)
                continue
            if lost:
                log.warning(
                    "mailbox %s: this poll lost its lease (stalled past %.0f s): it stops "
                    "before its next commit",
                    self.account_id,
                    self.seconds,
                )
                self.lost.set()
                return


@contextmanager
def mailbox_lock(account_id: int) -> Iterator[MailboxLock | None]:
    """`with mailbox_lock(id) as lease:` — lease is None when another poll has the mailbox."""
    lock = MailboxLock(account_id)
    held = lock.acquire()
    if not held:
        # Asked before trying again: either the holder takes the request as it lets go,
        # or it has let go already and this poll gets the mailbox.
        redis.shared().set(rerun_key(account_id), 1, px=lock.milliseconds)
        held = lock.acquire()
        if held:  # this poll looks after every request made so far
            redis.shared().delete(rerun_key(account_id))
    try:
        yield lock if held else None
    finally:
        if held and not lock.release():
            log.warning("lease of mailbox %s was lost before the poll ended", account_id)


def rerun_requested(account_id: int) -> bool:
    """Whether a poll found the mailbox held by the one now letting go of it; the request
    is taken (one rerun answers any number of them). Call after the lock is released."""
    return bool(redis.shared().getdel(rerun_key(account_id)))


def held(account_ids: Iterable[int]) -> set[int]:
    """Which of these mailboxes a live poll holds now (one round trip)."""
    ids = list(account_ids)
    if not ids:
        return set()
    with redis.shared().pipeline(transaction=False) as pipe:
        for account_id in ids:
            pipe.exists(lock_key(account_id))
        replies = pipe.execute()
    return {account_id for account_id, reply in zip(ids, replies, strict=True) if reply}
