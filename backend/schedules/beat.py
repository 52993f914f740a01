"""The beat scheduler: RedBeat, plus what running it against a Redis that may lose
everything needs.

- At start, the schedule is reconciled with the database.
- Every few seconds the tick checks (one EXISTS) that the schedule is still in Redis;
  when it is gone (FLUSHALL, a failover to an empty replica) the static entries are put
  back and the schedule is rebuilt from the database at once. (Celery sends tasks to
  their queue by name, so the queues need no re-declaring.)
- RedBeat's lock (one active beat) is short-lived and renewed on every tick and during a
  long dispatch, so a beat killed outright is replaced within seconds. A beat waiting for
  the lock says so in its log every few seconds (RedBeat waits silently).
- The lock vanishes with the data, and RedBeat would then crash on its next tick: the
  lock is taken again, or, if another beat took it meanwhile, this beat stands by until
  it is free.
- A Redis that stops answering makes the tick wait and retry instead of ending beat.
- A mailbox entry is sent when its score (its exact next run) comes, from its
  definition alone, parsed as plain JSON rather than built into RedBeat's entry objects;
  a tick reads the due entries in one pipeline, writes their next runs in another and
  hands their polls to the broker in a third (kombu's publish batch), at most DUE_BATCH
  at a time; the next run is whole intervals after the run that was due, so late
  sends (a restart, a backlog) do not move a mailbox's phase. One beat carries 100,000
  mailboxes at a 5-minute interval (docs/benchmarks.md), and a backlog goes out in
  passes that each renew the lock.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from datetime import UTC, datetime
from typing import Any

from celery.beat import ScheduleEntry
from celery.signals import beat_init
from redbeat.decoder import RedBeatJSONEncoder
from redbeat.schedulers import (
    LUA_EXTEND_TO_SCRIPT,
    RedBeatScheduler,
    acquire_distributed_beat_lock,
    get_redis,
)

from backend import dispatch, redis
from backend.config import get_settings
from backend.db import session_scope
from backend.schedules import service, store

log = logging.getLogger(__name__)

# How often the tick checks that the schedule is still in Redis.
EMPTY_CHECK_SECONDS = 5.0
# How long the tick waits when Redis does not answer.
REDIS_RETRY_SECONDS = 5.0
# While another beat holds the lock, a line in the log this often.
LOCK_WAIT_LOG_SECONDS = 5.0
# During a long dispatch, the lock is renewed this often.
LOCK_RENEW_SECONDS = 1.0
# Entries sent per pass of the tick: a backlog (a beat that was down, a rebuild) goes out
# in passes of this many, each renewing the lock, rather than in one pass longer than it.
DUE_BATCH = 1_000
# The shortest wait between two ticks that are not sending a backlog: a poll goes out at
# most this late, and each tick carries the entries due meanwhile (issue 32: at 200
# entries a second beat ticked for every one or two).
MIN_TICK_SECONDS = 0.1
# How often beat looks for coalescing keys whose poll is gone (a failover, a dead worker).
LOST_CHECK_SECONDS = 1.0


class MailbeatScheduler(RedBeatScheduler):  # type: ignore[misc]
    _next_empty_check = 0.0
    _next_lost_check = 0.0

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        dispatch.assume_celery_mode()
        # A "task-sent" event per dispatch would double beat's Redis traffic (and halve
        # the polls it can send per second); Flower still sees every poll from the
        # worker's events (received, started, succeeded, revoked when expired).
        app.conf.task_send_sent_event = False
        settings = get_settings()
        # The coalescing keys (REDIS_URL) and the schedule (REDBEAT_REDIS_URL) in one.
        self._one_redis = settings.effective_redbeat_redis_url == settings.redis_url
        super().__init__(app, *args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        self._reconcile("beat start")

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            self._hold_lock()
            if self._rebuild_if_empty():
                self._hold_lock()  # a long rebuild may have outlasted the lock
            return self._dispatch_due()
        except (redis.RedisConnectionError, redis.RedisTimeoutError) as exc:
            log.warning(
                "beat: Redis is not answering (%s); retrying in %ss", exc, REDIS_RETRY_SECONDS
            )
            return REDIS_RETRY_SECONDS
        except redis.LockError:
            # A renewal during the dispatch found the lock gone (this beat was stopped for
            # longer than the lock lives): stop sending; the next tick takes the lock back
            # or stands by.
            log.warning("beat: lost the beat lock while dispatching; stopped sending")
            return 0.0

    @property
    def schedule(self) -> dict[str, Any]:
        """The entries due now (at most DUE_BATCH), RedBeat's way: for anything that reads
        the scheduler's schedule; the tick itself reads mailbox entries leaner."""
        client = get_redis(self.app)
        due = client.zrangebyscore(
            self.app.redbeat_conf.schedule_key, "-inf", time.time(), start=0, num=DUE_BATCH
        )
        return self._load_entries(due)

    def _load_entries(self, keys: list[str]) -> dict[str, Any]:
        """RedBeat entries read in one pipeline (RedBeat reads them one round trip each)."""
        client = get_redis(self.app)
        with client.pipeline(transaction=False) as pipe:
            for entry_key in keys:
                pipe.hmget(entry_key, "definition", "meta")
            stored = pipe.execute()
        entries = {}
        for entry_key, (definition, meta) in zip(keys, stored, strict=True):
            if not definition:
                log.warning("beat: schedule entry %s has no definition; dropping it", entry_key)
                client.zrem(self.app.redbeat_conf.schedule_key, entry_key)
                continue
            try:
                fields = self.Entry.decode_definition(definition)
                last_run_at = self.Entry.decode_meta(meta)["last_run_at"]
                entry = self.Entry(app=self.app, **fields)
            except Exception:
                log.exception("beat: schedule entry %s cannot be read; skipping it", entry_key)
                continue
            entry.last_run_at = last_run_at
            entries[entry.name] = entry
        return entries

    def _dispatch_due(self) -> float:
        """Send the entries due now, at most DUE_BATCH of them (then the tick comes back at
        once: a backlog is sent in passes, the lock renewed in between); returns how long
        to sleep until the next one.

        A mailbox entry is due when its score (the next run, epoch seconds) has come: its
        `definition` alone is read, in one pipeline for all, and its next run (`next_run`:
        in phase with the run that was due) and `meta` are written in another before
        the polls are sent: a beat that dies in between skips those polls once rather
        than sending them twice. The few other entries (beat's periodic tasks) go through
        RedBeat's entries.

        A mailbox's poll is sent only if its previous one is no longer waiting in the
        queue (its coalescing key, claimed for all due polls in one round trip, is freed
        by the worker as the poll starts). When the workers cannot keep up, each mailbox
        thus holds at most one place in the queue and is polled in turn: every interval
        stretches alike instead of some mailboxes starving behind expired polls."""
        started = time.monotonic()
        client = get_redis(self.app)
        key = self.app.redbeat_conf.schedule_key
        now = time.time()
        with client.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(key, "-inf", now, start=0, num=DUE_BATCH, withscores=True)
            pipe.zrangebyscore(key, f"({now}", "+inf", start=0, num=1, withscores=True)
            due, upcoming = pipe.execute()
        waits = [float(self.max_interval)]
        if upcoming:
            waits.append(upcoming[0][1] - now)
        if len(due) == DUE_BATCH:
            waits.append(0.0)
        prefix = store.mailbox_key_prefix()
        polls = {entry_key: score for entry_key, score in due if entry_key.startswith(prefix)}
        others = [entry_key for entry_key, _ in due if not entry_key.startswith(prefix)]
        self._send_polls(polls, now)
        waits += self._send_others(others)
        # The waits were measured before sending: sending took part of them already.
        wait = min(waits) - (time.monotonic() - started)
        if len(due) == DUE_BATCH:
            return max(wait, 0.0)
        # Entries spread over the interval fall due every few milliseconds: a tick each
        # would cost its round trips (the lock, the due range, the pipelines) for one
        # or two entries. Ticks at least MIN_TICK_SECONDS apart send them in groups.
        return max(wait, MIN_TICK_SECONDS)

    def _send_polls(self, due: dict[str, float], now: float) -> None:
        """`due`: the entries' keys and scores (when each was due).

        A mailbox a watcher checks on a held session (backend/push/held.py: its
        `checked` key is there) is only rescheduled, and sent a poll only at its safety
        slot: no meta written, no coalescing key claimed. The others' next runs, meta
        and coalescing keys go in one pipeline."""
        if not due:
            return
        keys = list(due)
        client = get_redis(self.app)
        prefix = store.mailbox_key_prefix()
        with client.pipeline(transaction=False) as pipe:
            for entry_key in keys:
                pipe.hget(entry_key, "definition")
                pipe.exists(store.CHECKED_PREFIX + entry_key[len(prefix) :])
            replies = pipe.execute()
        safety = float(get_settings().held_safety_interval_seconds)
        polls: list[tuple[str, store.PollEntry]] = []
        checked: dict[str, float] = {}  # held entries: their next run
        unreadable: list[str] = []
        for entry_key, definition, held in zip(keys, replies[0::2], replies[1::2], strict=True):
            poll = store.read_poll_entry(definition)
            if poll is None:
                unreadable.append(entry_key)
            elif held and not safety_due(entry_key, due[entry_key], poll.interval, safety):
                checked[entry_key] = next_run(due[entry_key], poll.interval, now)
            else:
                polls.append((entry_key, poll))
        meta = store.meta_json(datetime.fromtimestamp(now, UTC))
        pending = [store.pending_key(poll.account_id) for _, poll in polls]
        expiry = max(1, round(store.pending_seconds() * 1000))
        with client.pipeline(transaction=False) as pipe:
            if unreadable:
                # RedBeat's rule for an entry it cannot load; the next reconcile rewrites
                # it from the database.
                log.warning(
                    "beat: %d schedule entries cannot be read (%s...); removed until the "
                    "next reconcile rewrites them",
                    len(unreadable),
                    unreadable[0],
                )
                pipe.zrem(self.app.redbeat_conf.schedule_key, *unreadable)
            for entry_key, _ in polls:
                pipe.hset(entry_key, "meta", meta)
            if polls or checked:
                pipe.zadd(
                    self.app.redbeat_conf.schedule_key,
                    {
                        **checked,
                        **{
                            entry_key: next_run(due[entry_key], poll.interval, now)
                            for entry_key, poll in polls
                        },
                    },
                )
            # The coalescing keys claimed in the same round trip (dispatch.claim_many's
            # command) when they live in the schedule's Redis: a mailbox whose previous
            # poll still waits costs no more.
            claims = pending if self._one_redis else []
            for key in claims:
                pipe.set(dispatch.COALESCE_PREFIX + key, 1, nx=True, px=expiry)
            replies = pipe.execute()
        if self._one_redis:
            free = [bool(reply) for reply in replies[len(replies) - len(pending) :]]
        else:
            free = dispatch.claim_many(pending, store.pending_seconds()) if pending else []
        if not all(free) and time.monotonic() >= self._next_lost_check:
            # At most once a second: under a backlog most ticks find keys held, and
            # looking at the queue each time cost more than the polls sent.
            self._next_lost_check = time.monotonic() + LOST_CHECK_SECONDS
            free = self._retake_lost(pending, free)
        waiting = 0
        renewed = time.monotonic()
        batched: list[str] = []  # the coalescing keys of the polls in the broker batch
        try:
            # One pipeline to the broker for the whole pass (kombu's publish batch) rather
            # than a round trip (and a new client) per poll.
            with self.producer.batch(max_size=DUE_BATCH):
                for (_, poll), pending_key, is_free in zip(polls, pending, free, strict=True):
                    if time.monotonic() - renewed > LOCK_RENEW_SECONDS:
                        self._renew_lock()
                        renewed = time.monotonic()
                    if not is_free:
                        waiting += 1
                        continue
                    if self._send_poll(poll, pending_key):
                        batched.append(pending_key)
        except Exception as exc:
            # The batch's unsent polls are dropped: free their mailboxes for the next run.
            for pending_key in batched:
                dispatch.release(pending_key)
            if isinstance(exc, redis.LockError):
                raise
            log.exception("Scheduler: could not send %d polls", len(batched))
        if waiting:
            log.info(
                "beat: %d due polls not sent: each mailbox's previous poll still waits in "
                "the queue (the workers are behind; see GET /admin/capacity)",
                waiting,
            )

    def _retake_lost(self, pending: list[str], free: list[bool]) -> list[bool]:
        """A coalescing key stands for a poll waiting in the queue: the poll frees it as
        it starts. A key claimed longer ago than the oldest poll in the queue was sent
        (by a margin of MAILBOX_LEASE_SECONDS, for the clocks and a worker between
        taking a poll and starting it) stands for a poll that is gone: lost with a Redis
        failover's last writes, or taken by a worker that died. Such keys are claimed
        anew and their mailboxes' polls sent, rather than waiting for the key to expire
        (twice POLL_TIME_LIMIT_SECONDS). Returns `free` with those keys taken."""
        expiry = store.pending_seconds()
        held = [key for key, is_free in zip(pending, free, strict=True) if not is_free]
        try:
            _length, oldest = service.poll_queue()
            margin = (oldest or 0.0) + get_settings().mailbox_lease_seconds
            lost = [
                key
                for key, age in zip(held, dispatch.ages(held, expiry), strict=True)
                if age is not None and age > margin
            ]
            if not lost:
                return free
            taken = {key for key, ok in zip(lost, dispatch.retake(lost, expiry), strict=True) if ok}
        except redis.RedisError:
            log.warning("beat: could not look for lost polls' coalescing keys", exc_info=True)
            return free
        log.warning(
            "beat: %d mailboxes held by a poll no longer in the queue (lost with a Redis "
            "failover or a dead worker): polled again",
            len(taken),
        )
        return [is_free or key in taken for key, is_free in zip(pending, free, strict=True)]

    def _send_poll(self, poll: store.PollEntry, pending_key: str) -> bool:
        log.info("Scheduler: Sending due task %s (%s)", poll.name, store.POLL_TASK)
        # When it was sent, for the age of the oldest queued poll (capacity).
        headers = {
            service.SENT_AT_HEADER: time.time(),
            dispatch.COALESCE_HEADER: pending_key,
            "celery_beat_task": True,
        }
        try:
            self.send_task(
                store.POLL_TASK,
                [poll.account_id],
                {},
                producer=self.producer,
                headers=headers,
                **poll.options,
            )
        except Exception:
            log.exception("Scheduler: could not send %s", poll.name)
            dispatch.release(pending_key)
            return False
        return True

    def _send_others(self, keys: list[str]) -> list[float]:
        """Beat's own periodic tasks, RedBeat's way (a handful of entries)."""
        due: list[Any] = []
        waits: list[float] = []
        for entry in self._load_entries(keys).values():
            is_due, next_check = entry.is_due()
            if is_due:
                due.append(entry)
            if next_check:
                waits.append(float(next_check))
        if not due:
            return waits
        reserved = [ScheduleEntry._next_instance(entry) for entry in due]
        with get_redis(self.app).pipeline(transaction=False) as pipe:
            for entry in reserved:
                meta = {"last_run_at": entry.last_run_at, "total_run_count": entry.total_run_count}
                pipe.hset(entry.key, "meta", json.dumps(meta, cls=RedBeatJSONEncoder))
                pipe.zadd(self.app.redbeat_conf.schedule_key, {entry.key: entry.score})
            pipe.execute()
        for entry in reserved:
            log.info("Scheduler: Sending due task %s (%s)", entry.name, entry.task)
            entry.options = {**entry.options, "headers": {service.SENT_AT_HEADER: time.time()}}
            try:
                self.apply_async(entry, producer=self.producer, advance=False)
            except Exception:
                log.exception("Scheduler: could not send %s", entry.name)
        return waits

    def _renew_lock(self) -> None:
        if self.lock_key and self.lock is not None:
            self.lock.extend(int(self.lock_timeout))

    def _hold_lock(self) -> None:
        if not self.lock_key:
            return
        if self.lock is None:
            # beat_init could not take it (Redis down at start): take it before dispatching.
            take_lock(self)
            return
        try:
            # RedBeat's extend-to checks the lock is still this beat's: one round trip
            # both renews and checks it.
            self.lock.extend(int(self.lock_timeout))
            return
        except redis.LockError:
            pass
        if self.lock.acquire(blocking=False):
            log.warning("beat: the beat lock had vanished (Redis lost its data?); took it again")
            return
        log.warning("beat: another beat holds the lock now; standing by until it is free")
        _wait_for(self.lock, self)
        log.info("beat: acquired the lock; dispatching again")

    def _rebuild_if_empty(self) -> bool:
        """True if the schedule was missing and has been rebuilt."""
        now = time.monotonic()
        if now < self._next_empty_check:
            return False
        self._next_empty_check = now + EMPTY_CHECK_SECONDS
        if get_redis(self.app).exists(self.app.redbeat_conf.schedule_key):
            return False
        log.warning("beat: the schedule is missing from Redis: rebuilding it from the database")
        super().setup_schedule()  # the static entries (periodic reconcile)
        self._reconcile("schedule missing from Redis")
        return True

    def _reconcile(self, why: str) -> None:
        try:
            with session_scope() as session:
                result = service.reconcile(session)
        except Exception:
            # The periodic reconcile and the empty check try again; beat keeps dispatching.
            log.exception("beat: reconcile (%s) failed", why)
            return
        log.info("beat: reconciled the schedule (%s): %s", why, result.as_dict())


# A poll is never followed by the next one of its mailbox sooner than this part of the
# interval, however late it was sent.
MIN_GAP = 0.75


def next_run(due: float, interval: float, now: float) -> float:
    """The next run: a whole number of intervals after the run that was due, not one
    interval after it was sent, so a poll sent late (beat restarting, a backlog) keeps its
    mailbox's phase, and a crowd of late entries spreads out again as the phases placed
    them instead of staying a crowd. The first such time at least MIN_GAP of an interval
    from now: a run that would follow too closely, or was missed entirely (beat down for
    longer than an interval), is not made up."""
    interval = max(interval, 1.0)
    steps = max(1, math.ceil((now + MIN_GAP * interval - due) / interval))
    return due + steps * interval


def safety_due(entry_key: str, due: float, interval: float, safety: float) -> bool:
    """Whether the run of a held mailbox due at `due` is its safety poll: once every
    `safety` seconds, at an offset of its own (the entry's key spreads the mailboxes
    over the safety interval rather than sending them all together). Stateless: the
    run whose interval holds the mailbox's next safety point is the one."""
    if safety <= interval:
        return True
    offset = (zlib.crc32(entry_key.encode()) / 2**32) * safety
    return math.floor((due + offset) / safety) != math.floor((due - interval + offset) / safety)


def take_lock(scheduler: MailbeatScheduler) -> None:
    """RedBeat's start-up lock, taken as RedBeat does but saying in the log, every few
    seconds, that this beat is waiting and for how long the holder's lock still runs."""
    client = get_redis(scheduler.app)
    lock = client.lock(
        scheduler.lock_key, timeout=scheduler.lock_timeout, sleep=scheduler.max_interval
    )
    # RedBeat's extend sets the lock's expiry instead of adding to it.
    lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
    _wait_for(lock, scheduler)
    log.info("beat: Acquired lock")
    scheduler.lock = lock


def _wait_for(lock: Any, scheduler: MailbeatScheduler) -> None:
    if lock.acquire(blocking=False):
        return
    while True:
        expires = get_redis(scheduler.app).pttl(scheduler.lock_key)
        log.warning(
            "beat: waiting for the beat lock %s: another beat holds it (it expires in %.1fs "
            "unless that beat renews it); this beat sends nothing meanwhile",
            scheduler.lock_key,
            max(expires, 0) / 1000,
        )
        if lock.acquire(blocking_timeout=LOCK_WAIT_LOG_SECONDS):
            return


@beat_init.connect
def _take_lock_at_start(sender: Any = None, **_: Any) -> None:
    if isinstance(sender.scheduler, MailbeatScheduler) and sender.scheduler.lock_key:
        take_lock(sender.scheduler)


# Ours replaces RedBeat's handler, which waits for the lock without a word.
beat_init.disconnect(acquire_distributed_beat_lock)
