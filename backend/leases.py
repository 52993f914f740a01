"""Fenced leases in Redis: who holds a key, for as long as the holder is alive.

A lease is a key `{lease_prefix}{id}` whose value names its holder and a fencing token
(INCR of `{fence_prefix}{id}`, so every claim gets a larger one), set with an expiry of
`seconds`. The holder renews its leases (all of them in one round trip) every third of
that; renewing and releasing compare the whole value, so a holder that lost a lease (it
stalled past the expiry and another took over) learns it on its next renewal and can
neither extend nor delete the new holder's. A holder that dies stops renewing: what it
held is free within `seconds`.

Used for the watchers' mailboxes (backend/push/leases.py) and the polls' mailboxes
(backend/mailbox/lock.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from backend import redis

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


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def token(value: str) -> int:
    """The fencing token in a lease's value."""
    return int(value.rsplit(":", 1)[1])


class Leases:
    """One holder's side of the leases under one prefix: `holder` names it in every
    value it sets."""

    def __init__(
        self, holder: str, seconds: float, *, lease_prefix: str, fence_prefix: str
    ) -> None:
        self.holder = holder
        self.milliseconds = max(1, round(seconds * 1000))
        self.seconds = seconds
        self.lease_prefix = lease_prefix
        self.fence_prefix = fence_prefix
        self._client = redis.shared()
        self._claim = self._client.register_script(_CLAIM)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)

    def key(self, lease_id: int) -> str:
        return f"{self.lease_prefix}{lease_id}"

    def claim(self, lease_ids: Sequence[int]) -> dict[int, str]:
        """Try to take these leases (one round trip); the ones taken, with their value."""
        if not lease_ids:
            return {}
        with self._client.pipeline(transaction=False) as pipe:
            for lease_id in lease_ids:
                self._claim(
                    keys=[self.key(lease_id), f"{self.fence_prefix}{lease_id}"],
                    args=[self.holder, self.milliseconds],
                    client=pipe,
                )
            replies = pipe.execute()
        return {
            lease_id: text(reply)
            for lease_id, reply in zip(lease_ids, replies, strict=True)
            if reply
        }

    def renew(self, held: dict[int, str]) -> set[int]:
        """Extend every lease still ours; returns the ones lost."""
        if not held:
            return set()
        ids = list(held)
        replies = self._renew(
            keys=[self.key(lease_id) for lease_id in ids],
            args=[self.milliseconds, *(held[lease_id] for lease_id in ids)],
        )
        return {lease_id for lease_id, ok in zip(ids, replies, strict=True) if not ok}

    def release(self, lease_id: int, value: str) -> bool:
        """Delete the lease if it is still ours; whether it was."""
        return bool(self._release(keys=[self.key(lease_id)], args=[value]))
