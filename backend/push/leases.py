"""Which watcher holds which mailbox: fenced leases in Redis, no coordinator.

A lease is a key `mailbeat:push:lease:{account_id}` whose value names its holder and a
fencing token (INCR of `mailbeat:push:fence:{account_id}`, so every claim gets a larger
one), set with an expiry of WATCHER_LEASE_SECONDS. The holder renews all its leases in
one round trip every third of that; renewing, and releasing, compare the whole value, so
a watcher that lost a lease (it stalled past the expiry and another took over) learns it
on its next renewal and cannot extend or delete the new holder's. A watcher that dies
stops renewing: its mailboxes are free within WATCHER_LEASE_SECONDS.

A stale holder can at worst send a poll the new one would also send; polls are
coalesced per mailbox (backend/dispatch.py), so that costs nothing.

Watchers also announce themselves (a sorted set of heartbeats) so each can compute its
fair share of the connections: adding a watcher makes the others give some up.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import cast

from backend import redis
from backend.config import get_settings

LEASE_PREFIX = "mailbeat:push:lease:"
FENCE_PREFIX = "mailbeat:push:fence:"
WATCHERS_KEY = "mailbeat:push:watchers"

# KEYS: lease, fence. ARGV: holder, milliseconds. The new value, or nil when held.
_CLAIM = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. ':' .. redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], value, 'PX', ARGV[2])
return value
"""
# KEYS: leases. ARGV: milliseconds, then each lease's value. 1 where renewed, else 0.
_RENEW = """
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[i + 1] then
    redis.call('pexpire', key, ARGV[1])
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
"""
# KEYS: lease. ARGV: value. Deleted only by its holder.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def watcher_name(pid: int, suffix: str) -> str:
    """How a watcher is named in leases and heartbeats: host, process, a random part."""
    return f"{socket.gethostname()}-{pid}-{suffix}"


def alive() -> bool:
    """Whether a watcher on this host announced itself within its lease time (the
    compose health check: a container's host name is its own)."""
    prefix = f"{socket.gethostname()}-"
    with redis.probe(timeout=5) as client:
        beats = client.zrangebyscore(WATCHERS_KEY, time.time() - _lease_seconds(), "+inf")
    return any(_text(beat).startswith(prefix) for beat in cast(list[bytes | str], beats))


def _lease_seconds() -> float:
    return get_settings().watcher_lease_seconds


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lease_key(account_id: int) -> str:
    return f"{LEASE_PREFIX}{account_id}"


class Leases:
    """One watcher's side of the leases: `holder` names it in every value it sets."""

    def __init__(self, holder: str, seconds: float) -> None:
        self.holder = holder
        self.milliseconds = max(1, round(seconds * 1000))
        self.seconds = seconds
        self._client = redis.shared()
        self._claim = self._client.register_script(_CLAIM)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)

    def claim(self, account_ids: Sequence[int]) -> dict[int, str]:
        """Try to take these mailboxes (one round trip); the ones taken, with their value."""
        if not account_ids:
            return {}
        with self._client.pipeline(transaction=False) as pipe:
            for account_id in account_ids:
                self._claim(
                    keys=[lease_key(account_id), f"{FENCE_PREFIX}{account_id}"],
                    args=[self.holder, self.milliseconds],
                    client=pipe,
                )
            replies = pipe.execute()
        return {
            account_id: _text(reply)
            for account_id, reply in zip(account_ids, replies, strict=True)
            if reply
        }

    def renew(self, held: dict[int, str]) -> set[int]:
        """Extend every lease still ours; returns the mailboxes whose lease was lost."""
        if not held:
            return set()
        ids = list(held)
        replies = self._renew(
            keys=[lease_key(account_id) for account_id in ids],
            args=[self.milliseconds, *(held[account_id] for account_id in ids)],
        )
        return {account_id for account_id, ok in zip(ids, replies, strict=True) if not ok}

    def release(self, account_id: int, value: str) -> None:
        self._release(keys=[lease_key(account_id)], args=[value])

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
