"""Which watcher holds which mailbox: fenced leases in Redis (backend/leases.py), no
coordinator.

A watcher's lease on a mailbox is `mailbeat:push:lease:{account_id}`, lasting
WATCHER_LEASE_SECONDS and renewed every third of that: a watcher that dies stops
renewing, and its mailboxes are free within WATCHER_LEASE_SECONDS. A stale holder can
at worst send a poll the new one would also send; polls are coalesced per mailbox
(backend/dispatch.py), so that costs nothing.

Watchers also announce themselves (a sorted set of heartbeats) so each can compute its
fair share of the connections: adding a watcher makes the others give some up.
"""

from __future__ import annotations

import socket
import time
from typing import cast

from backend import leases as fenced
from backend import redis
from backend.config import get_settings

LEASE_PREFIX = "mailbeat:push:lease:"
FENCE_PREFIX = "mailbeat:push:fence:"
WATCHERS_KEY = "mailbeat:push:watchers"


def watcher_name(pid: int, suffix: str) -> str:
    """How a watcher is named in leases and heartbeats: host, process, a random part."""
    return f"{socket.gethostname()}-{pid}-{suffix}"


def alive() -> bool:
    """Whether a watcher on this host announced itself within its lease time (the
    compose health check: a container's host name is its own)."""
    prefix = f"{socket.gethostname()}-"
    with redis.probe(timeout=5) as client:
        beats = client.zrangebyscore(WATCHERS_KEY, time.time() - _lease_seconds(), "+inf")
    return any(fenced.text(beat).startswith(prefix) for beat in cast(list[bytes | str], beats))


def live_processes() -> set[str]:
    """The watchers that announced themselves within their lease, as `host-pid` (how
    backend/metrics.py names a process's files)."""
    with redis.probe(timeout=5) as client:
        beats = client.zrangebyscore(WATCHERS_KEY, time.time() - _lease_seconds(), "+inf")
    return {fenced.text(beat).rsplit("-", 1)[0] for beat in cast(list[bytes | str], beats)}


def _lease_seconds() -> float:
    return get_settings().watcher_lease_seconds


def lease_key(account_id: int) -> str:
    return f"{LEASE_PREFIX}{account_id}"


class Leases(fenced.Leases):
    """One watcher's side of the leases: `holder` names it in every value it sets."""

    def __init__(self, holder: str, seconds: float) -> None:
        super().__init__(holder, seconds, lease_prefix=LEASE_PREFIX, fence_prefix=FENCE_PREFIX)

    def heartbeat(self) -> int:
        """Say this watcher is alive; returns how many watchers are (itself included)."""
        now = time.time()
        with self._client.pipeline(transaction=False) as pipe:
            pipe.zadd(WATCHERS_KEY, {self.holder: now})
            pipe.zremrangebyscore(WATCHERS_KEY, "-inf", now - self.seconds)
            pipe.zcard(WATCHERS_KEY)
            replies = pipe.execute()
        return max(1, int(replies[-1]))

    def leave(self) -> None:
        self._client.zrem(WATCHERS_KEY, self.holder)
