"""When processing last worked: the evidence that tells a poison message from an outage.

A message that fails on its own, handed on alone (a mailbox that gets one message per
poll, the sweep, its task's retry), says nothing by itself: the fault may be in it, or
in something every message needs (a handler's service down). So its failure counts
(backend/processing/service.py) only when some message was processed since its previous
failed attempt: then processing works and this message is the one that does not.

Every process keeps the time of its own latest success, and shares it in one Redis key
that every process reads, so a mailbox whose only traffic is a poison message learns that
processing works from the other mailboxes, whichever worker processed them. Writing it
costs one Redis round trip per process at most every WRITE_EVERY_SECONDS, never one per
message; reading it, one round trip per failed attempt. A success kept back by that
pacing is seen later, or by this process at once: the evidence can be late, never
invented, so an outage still counts nothing. (The times come from the workers' clocks:
their skew, milliseconds, is nothing beside the seconds between two attempts at a
message.) Without Redis (the local mode runs everything in one process, where its own
time is the whole truth; or Redis away) a process goes on its own successes alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import TypeVar

from backend import redis
from backend.models import utcnow

log = logging.getLogger(__name__)

T = TypeVar("T")

SUCCESS_KEY = "mailbeat:processing:succeeded-at"
# At most one write of a process's latest success a second: a busy worker processing
# batches of one message pays no round trip per message.
WRITE_EVERY_SECONDS = 1.0
# Reading and writing the key must not hold processing up when Redis is slow or away;
# after a failure, a process leaves Redis alone this long.
REDIS_TIMEOUT_SECONDS = 0.5
REDIS_QUIET_SECONDS = 30.0


class _Progress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latest: datetime | None = None
        self.written_at = float("-inf")  # time.monotonic() of the last write
        self.quiet_until = 0.0

    def succeeded(self) -> None:
        now = utcnow()
        with self.lock:
            self.latest = now if self.latest is None else max(self.latest, now)
            if time.monotonic() - self.written_at < WRITE_EVERY_SECONDS:
                return
            self.written_at = time.monotonic()
        self._shared(lambda client: client.set(SUCCESS_KEY, repr(now.timestamp())))

    def last_success(self) -> datetime | None:
        shared = self._shared(lambda client: client.get(SUCCESS_KEY))  # bytes or None
        times = [] if self.latest is None else [self.latest]
        if shared is not None:
            times.append(datetime.fromtimestamp(float(shared), UTC))
        return max(times, default=None)

    def _shared(self, call: Callable[[redis.Redis], T]) -> T | None:
        if time.monotonic() < self.quiet_until:
            return None
        try:
            return call(_redis())
        except redis.RedisError as exc:
            self.quiet_until = time.monotonic() + REDIS_QUIET_SECONDS
            log.warning(
                "processing: Redis does not answer (%s); for %.0fs this process judges "
                "failed messages by its own successes alone",
                type(exc).__name__,
                REDIS_QUIET_SECONDS,
            )
            return None


@lru_cache
def _redis() -> redis.Redis:
    return redis.connect(timeout=REDIS_TIMEOUT_SECONDS, retries=False)


_progress = _Progress()


def succeeded() -> None:
    """Messages were processed (committed) just now."""
    _progress.succeeded()


def last_success() -> datetime | None:
    """The latest time any process is known to have processed a message; None when none
    is known."""
    return _progress.last_success()


def forget() -> None:
    """This process's state only: its own latest success, its pacing (tests: each starts
    afresh, or one stands for another process that knows only what Redis says)."""
    global _progress  # noqa: PLW0603 - this process's state
    _progress = _Progress()
    _redis.cache_clear()
