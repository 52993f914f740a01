"""One connection budget per IMAP host (and per login), shared by every process that
connects: polls and the sessions they keep (backend/mailbox/pool.py), backfills and
audits (through `service.open_mailbox`), and the watchers' IDLE connections
(backend/push/watcher.py).

A connection holds a slot. In Redis a host's slots are a sorted set
`mailbeat:budget:host:{host}` of holders scored by their expiry (Redis's own clock), and
a login's the same under `mailbeat:budget:login:{host}:{username}`; one Lua call drops
the expired ones, counts and claims in both. The process holding slots renews them all
every third of CONNECTION_SLOT_SECONDS on a thread of its own, so a process that dies
(killed, its host lost) frees its slots within that time, with no one to clean up.
Limits come from the provider table (backend/mailbox/providers.py), the host's overridden
by CONNECTION_LIMITS.

A host that throttled a mailbox (`throttled`, called by the poll on a throttle answer)
is given one connection at a time until the server's wait is over: its other mailboxes
wait their turn instead of hammering it.

Whoever waits for a host's slot leaves a note (`mailbeat:budget:wanted:{host}`); a
process holding idle kept sessions on that host closes them at its next renewal (the
`on_wanted` hooks), so kept sessions never starve a poll.

Without Redis (local mode) the budget is this process's, in memory, with the same API.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from backend import dispatch, redis
from backend.config import get_settings
from backend.mailbox import providers
from backend.mailbox.imap import ImapError, ImapSession, Stage
from backend.models.enums import ErrorKind, SchedulerMode

log = logging.getLogger(__name__)

HOST_PREFIX = "mailbeat:budget:host:"
LOGIN_PREFIX = "mailbeat:budget:login:"
THROTTLED_PREFIX = "mailbeat:budget:throttled:"
WANTED_PREFIX = "mailbeat:budget:wanted:"
# How often a waiting claim asks again.
WAIT_STEP_SECONDS = 0.25

# KEYS: host set, login set, throttle key. ARGV: member, lease ms, host limit, login
# limit (0: none). {1} when claimed, else {0, in use, limit, 'host' or 'login'}.
_CLAIM = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limits = {tonumber(ARGV[3]), tonumber(ARGV[4])}
if redis.call('pttl', KEYS[3]) > 0 then limits[1] = 1 end
local names = {'host', 'login'}
for i = 1, 2 do
  redis.call('zremrangebyscore', KEYS[i], '-inf', now)
  local used = redis.call('zcard', KEYS[i])
  if limits[i] > 0 and used >= limits[i] then return {0, used, limits[i], names[i]} end
end
for i = 1, 2 do
  redis.call('zadd', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('pexpire', KEYS[i], 2 * tonumber(ARGV[2]))
end
return {1}
"""
# KEYS: a host set and a login set per slot. ARGV: lease ms, then each slot's member.
# Only slots still there are extended (XX): a release racing the renewal must win. The
# number of slots lost (a process stalled past the lease) is returned.
_RENEW = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = 0
for i = 2, #ARGV do
  for j = 0, 1 do
    local key = KEYS[2 * (i - 2) + 1 + j]
    if redis.call('zadd', key, 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i]) == 0 then
      lost = lost + 1
    end
    redis.call('pexpire', key, 2 * tonumber(ARGV[1]))
  end
end
return lost
"""


@dataclass(frozen=True)
class Limits:
    host: int | None
    login: int | None


def limits(host: str, *, leave: int = 0) -> Limits:
    """The caps on connections to `host`: CONNECTION_LIMITS's, else the provider's.
    `leave`: that many fewer (at least 1), the slots a long-lived holder leaves to others."""
    host = _key(host)
    provider = providers.for_host(host)
    override = get_settings().connection_limits.get(host)

    def less(cap: int | None) -> int | None:
        return None if cap is None else max(1, cap - leave)

    return Limits(less(override or provider.host_limit), less(provider.account_limit))


class NoSlot(ImapError):
    """No slot came free within the wait: the host (or login) has all it may have. Not
    the mailbox's failure: a poll records it as `no_slot` and is sent again soon."""

    kind: ErrorKind = ErrorKind.THROTTLED
    stage: Stage = "connect"

    def __init__(self, host: str, used: int, limit: int, which: str, throttled: bool) -> None:
        why = f"{host} has {used} of {limit} connections in use"
        if which == "login":
            why = f"this login on {host} has {used} of {limit} connections in use"
        if throttled:
            why += " (throttled by the server: one at a time until its wait is over)"
        super().__init__(f"waiting for a connection slot: {why}")
        self.host = host


@dataclass
class Slot:
    """One connection's place in the budget; `release` it when the connection closes.
    `member` names it in Redis: the process, what the connection is for, a random part."""

    host: str
    login: str
    member: str
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        _backend().release(self)


def _key(host: str) -> str:
    return host.lower().rstrip(".")


def _slot(host: str, username: str, purpose: str) -> Slot:
    member = f"{socket.gethostname()}-{os.getpid()}:{purpose}:{uuid.uuid4().hex[:8]}"
    return Slot(host, f"{host}:{username}", member)


def claim(host: str, username: str, purpose: str, *, leave: int = 0) -> Slot | None:
    """A slot for one connection to `host` as `username`, if one is free now (and
    `leave` more would still be)."""
    host = _key(host)
    slot = _slot(host, username, purpose)
    refused = _backend().claim(slot, limits(host, leave=leave))
    return None if refused else slot


def acquire(
    host: str, username: str, purpose: str, *, wait: float | None = None, leave: int = 0
) -> Slot:
    """A slot, waiting up to `wait` seconds (CONNECTION_SLOT_WAIT_SECONDS) for one to come
    free; raises NoSlot when none did. `leave`: as for `claim`."""
    host = _key(host)
    seconds = get_settings().connection_slot_wait_seconds if wait is None else wait
    deadline = time.monotonic() + seconds
    backend = _backend()
    refusals = 0
    while True:
        slot = _slot(host, username, purpose)
        refused = backend.claim(slot, limits(host, leave=leave))
        if refused is None:
            if refusals > 1:
                log.info("%s on %s: got a connection slot", purpose, host)
            return slot
        used, limit, which = refused
        refusals += 1
        # This process's own kept sessions on the host go at once: asked again at once.
        backend.want(host)
        if refusals == 1:
            continue
        if refusals == 2:
            log.info(
                "%s on %s: waiting for a connection slot (%s: %d of %d in use)",
                purpose,
                host,
                which,
                used,
                limit,
            )
        if time.monotonic() + WAIT_STEP_SECONDS > deadline:
            raise NoSlot(host, used, limit, which, throttled_until(host) is not None)
        time.sleep(WAIT_STEP_SECONDS)


def again_seconds() -> float:
    """When a poll, backfill or audit that found no slot is sent again."""
    return get_settings().connection_slot_wait_seconds or 5


def connect(
    host: str,
    username: str,
    purpose: str,
    open_session: Callable[[], ImapSession],
    *,
    wait: float | None = None,
    leave: int = 0,
) -> ImapSession:
    """`open_session()` once a slot is had (`acquire`); the slot is released when the
    session (or the IDLE link it becomes) is closed. A connection held for long (IDLE)
    passes `leave=1`, so the polls of its host always have a slot to wait for."""
    slot = acquire(host, username, purpose, wait=wait, leave=leave)
    try:
        session = open_session()
    except BaseException:
        slot.release()
        raise
    session.on_close(slot.release)
    return session


def throttled(host: str, seconds: float) -> None:
    """The server at `host` throttled a mailbox: one connection at a time to it for
    `seconds`."""
    if seconds > 0:
        _backend().throttle(_key(host), seconds)


def throttled_until(host: str) -> float | None:
    """When the host's throttle ends (epoch seconds), or None when it is not throttled."""
    return _backend().throttled_until(_key(host))


def in_use(host: str) -> int:
    """Connections to `host` holding a slot now (every process)."""
    return _backend().in_use(_key(host))


def usage() -> tuple[dict[str, int], list[str]]:
    """The slots held per host (every process), and the hosts throttled now: for the
    metrics."""
    return _backend().usage()


# Called with a host some claim is waiting for: close idle kept sessions there.
_wanted_hooks: list[Callable[[str], None]] = []


def on_wanted(hook: Callable[[str], None]) -> None:
    if hook not in _wanted_hooks:
        _wanted_hooks.append(hook)


def _call_wanted(host: str) -> None:
    for hook in _wanted_hooks:
        try:
            hook(host)
        except Exception:  # a hook must not stop the renewals
            log.exception("closing kept sessions on %s failed", host)


# -- where the slots are kept --------------------------------------------------------


Refused = tuple[int, int, str]


class _Redis:
    """Slots in Redis, shared by every process; this process's renewed by a thread."""

    def __init__(self) -> None:
        self._client = redis.shared()
        self._claim = self._client.register_script(_CLAIM)
        self._renew = self._client.register_script(_RENEW)
        self._held: dict[str, Slot] = {}
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None

    def _lease_ms(self) -> int:
        return max(1000, round(get_settings().connection_slot_seconds * 1000))

    def claim(self, slot: Slot, limit: Limits) -> Refused | None:
        try:
            reply = self._claim(
                keys=[
                    HOST_PREFIX + slot.host,
                    LOGIN_PREFIX + slot.login,
                    THROTTLED_PREFIX + slot.host,
                ],
                args=[slot.member, self._lease_ms(), limit.host or 0, limit.login or 0],
            )
        except redis.RedisError as exc:
            # The budget protects the servers; it must not stop the polls while Redis
            # is away (a failover): the connection goes ahead uncounted.
            log.warning("connection budget unavailable (%s): %s connects uncounted", exc, slot.host)
            return None
        if int(reply[0]) != 1:
            return int(reply[1]), int(reply[2]), _text(reply[3])
        with self._guard:
            self._held[slot.member] = slot
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="connection-budget", daemon=True
                )
                self._renewer.start()
        return None

    def release(self, slot: Slot) -> None:
        with self._guard:
            self._held.pop(slot.member, None)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(HOST_PREFIX + slot.host, slot.member)
                pipe.zrem(LOGIN_PREFIX + slot.login, slot.member)
                pipe.execute()
        except redis.RedisError as exc:  # its expiry frees it
            log.warning("connection slot on %s not released (%s): it expires", slot.host, exc)

    def want(self, host: str) -> None:
        _call_wanted(host)  # this process's own kept sessions, at once
        try:
            self._client.set(WANTED_PREFIX + host, 1, px=self._lease_ms())
        except redis.RedisError as exc:  # the other processes' kept sessions age out
            log.warning("the wait for a slot on %s not announced (%s)", host, exc)

    def throttle(self, host: str, seconds: float) -> None:
        until = time.time() + seconds
        try:
            self._client.set(THROTTLED_PREFIX + host, until, px=max(1, round(seconds * 1000)))
        except redis.RedisError as exc:  # the throttled mailbox's own backoff still holds
            log.warning("%s's throttle not shared (%s)", host, exc)

    def throttled_until(self, host: str) -> float | None:
        value = self._client.get(THROTTLED_PREFIX + host)
        return None if value is None else float(_text(value))

    def in_use(self, host: str) -> int:
        key = HOST_PREFIX + host
        with self._client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", f"({_redis_now_ms(self._client)}")
            pipe.zcard(key)
            return int(pipe.execute()[-1])

    def usage(self) -> tuple[dict[str, int], list[str]]:
        now = _redis_now_ms(self._client)
        hosts = [
            _text(key)[len(HOST_PREFIX) :] for key in self._client.scan_iter(HOST_PREFIX + "*")
        ]
        with self._client.pipeline(transaction=False) as pipe:
            for host in hosts:
                pipe.zcount(HOST_PREFIX + host, f"({now}", "+inf")
            counts = pipe.execute()
        throttled = [
            _text(key)[len(THROTTLED_PREFIX) :]
            for key in self._client.scan_iter(THROTTLED_PREFIX + "*")
        ]
        return dict(zip(hosts, (int(n) for n in counts), strict=True)), throttled

    def _renew_forever(self) -> None:
        while True:
            time.sleep(get_settings().connection_slot_seconds / 3)
            with self._guard:
                held = list(self._held.values())
            if not held:
                continue
            try:
                keys: list[str] = []
                for slot in held:
                    keys += [HOST_PREFIX + slot.host, LOGIN_PREFIX + slot.login]
                lost = self._renew(keys=keys, args=[self._lease_ms(), *(s.member for s in held)])
                hosts = sorted({slot.host for slot in held})
                wanted = self._client.mget([WANTED_PREFIX + host for host in hosts])
            except redis.RedisError as exc:
                log.warning("connection slots not renewed: %s", exc)
                continue
            if lost:
                # Stalled past the lease, or released just now; a stall's connection
                # goes uncounted until it closes.
                log.debug("%s connection slots were gone when renewed", lost)
            for host, note in zip(hosts, cast(list[Any], wanted), strict=True):
                if note is not None:
                    _call_wanted(host)


def _redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Local:
    """This process's budget (local mode: one process polls and watches)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._hosts: dict[str, set[str]] = {}
        self._logins: dict[str, set[str]] = {}
        self._throttled: dict[str, float] = {}

    def claim(self, slot: Slot, limit: Limits) -> Refused | None:
        with self._guard:
            host_limit = 1 if self._until(slot.host) is not None else limit.host
            hosts = self._hosts.setdefault(slot.host, set())
            logins = self._logins.setdefault(slot.login, set())
            for used, cap, which in ((hosts, host_limit, "host"), (logins, limit.login, "login")):
                if cap is not None and len(used) >= cap:
                    return len(used), cap, which
            hosts.add(slot.member)
            logins.add(slot.member)
        return None

    def release(self, slot: Slot) -> None:
        with self._guard:
            self._hosts.get(slot.host, set()).discard(slot.member)
            self._logins.get(slot.login, set()).discard(slot.member)

    def want(self, host: str) -> None:
        _call_wanted(host)

    def throttle(self, host: str, seconds: float) -> None:
        with self._guard:
            self._throttled[host] = time.time() + seconds

    def throttled_until(self, host: str) -> float | None:
        with self._guard:
            return self._until(host)

    def _until(self, host: str) -> float | None:
        until = self._throttled.get(host)
        return until if until is not None and until > time.time() else None

    def in_use(self, host: str) -> int:
        with self._guard:
            return len(self._hosts.get(host, ()))

    def usage(self) -> tuple[dict[str, int], list[str]]:
        with self._guard:
            held = {host: len(members) for host, members in self._hosts.items() if members}
            return held, [host for host in self._throttled if self._until(host) is not None]


_backends: dict[tuple[int, SchedulerMode], _Redis | _Local] = {}
_backends_guard = threading.Lock()


def _backend() -> _Redis | _Local:
    """This process's budget: in Redis, or in memory in local mode. A forked child (a
    Celery worker) builds its own: its parent's renewer thread did not come along."""
    key = (os.getpid(), dispatch.mode())
    with _backends_guard:
        found = _backends.get(key)
        if found is None:
            found = _backends[key] = _Local() if key[1] == SchedulerMode.LOCAL else _Redis()
        return found


def reset() -> None:
    """Forget this process's budget (tests: a new Redis index, a new mode)."""
    with _backends_guard:
        _backends.clear()
