"""The beat scheduler: RedBeat, plus what running it against a Redis that may lose
everything needs.

- At start, the schedule is reconciled with the database.
- Every few seconds the tick checks (one EXISTS) that the schedule is still in Redis;
  when it is gone (FLUSHALL, a failover to an empty replica) the static entries are put
  back and the schedule is rebuilt from the database at once. (Celery sends tasks to
  their queue by name, so the queues need no re-declaring.)
- RedBeat's lock (one active beat) vanishes with the data, and RedBeat would then crash
  on its next tick: the lock is taken again, or, if another beat took it meanwhile, this
  beat stands by until it is free.
- A Redis that stops answering makes the tick wait and retry instead of ending beat.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redbeat.schedulers import RedBeatScheduler, get_redis

from backend.db import session_scope
from backend.schedules import service

log = logging.getLogger(__name__)

# How often the tick checks that the schedule is still in Redis.
EMPTY_CHECK_SECONDS = 5.0
# How long the tick waits when Redis does not answer.
REDIS_RETRY_SECONDS = 5.0


class MailbeatScheduler(RedBeatScheduler):  # type: ignore[misc]
    _next_empty_check = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        service.assume_celery_mode()
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self._reconcile("beat start")

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            self._hold_lock()
            self._rebuild_if_empty()
            return float(super().tick(min=min, **kwargs))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning(
                "beat: Redis is not answering (%s); retrying in %ss", exc, REDIS_RETRY_SECONDS
            )
            return REDIS_RETRY_SECONDS

    def _hold_lock(self) -> None:
        if not self.lock_key:
            return
        if self.lock is None:
            # beat_init could not take it (Redis down at start): take it before dispatching.
            from redbeat.schedulers import acquire_distributed_beat_lock

            acquire_distributed_beat_lock(sender=_Sender(self))
            return
        if self.lock.owned():
            return
        if self.lock.acquire(blocking=False):
            log.warning("beat: the beat lock had vanished (Redis lost its data?); took it again")
            return
        log.warning("beat: another beat holds the lock now; standing by until it is free")
        self.lock.acquire()
        log.info("beat: acquired the lock; dispatching again")

    def _rebuild_if_empty(self) -> None:
        now = time.monotonic()
        if now < self._next_empty_check:
            return
        self._next_empty_check = now + EMPTY_CHECK_SECONDS
        if get_redis(self.app).exists(self.app.redbeat_conf.schedule_key):
            return
        log.warning("beat: the schedule is missing from Redis: rebuilding it from the database")
        super().setup_schedule()  # the static entries (periodic reconcile)
        self._reconcile("schedule missing from Redis")

    def _reconcile(self, why: str) -> None:
        try:
            with session_scope() as session:
                result = service.reconcile(session)
        except Exception:
            # The periodic reconcile and the empty check try again; beat keeps dispatching.
            log.exception("beat: reconcile (%s) failed", why)
            return
        log.info("beat: reconciled the schedule (%s): %s", why, result.as_dict())


class _Sender:
    """What RedBeat's beat_init handler reads from its sender: the scheduler."""

    def __init__(self, scheduler: MailbeatScheduler) -> None:
        self.scheduler = scheduler
