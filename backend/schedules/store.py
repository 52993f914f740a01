"""The RedBeat schedule in Redis: one hash `redbeat:mailbox:{id}` per mailbox (fields
`definition` and `meta`) and its score (the next run, epoch seconds) in the sorted set
`redbeat::schedule`, the layout RedBeat 2.4 reads on every tick.

Entries are read and written here in pipelines rather than through
`RedBeatSchedulerEntry.save()`, which costs a round trip per entry: 10,000 entries are
compared and fixed in a handful of round trips. The JSON is RedBeat's own encoding.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from celery import Celery
from redbeat.decoder import RedBeatJSONDecoder
from redbeat.schedulers import ensure_conf, get_redis

from backend import redis
from backend.celery_app import DEFAULT_PRIORITY, app, broker_priority
from backend.config import get_settings
from backend.schedules.phase import initial_last_run

log = logging.getLogger(__name__)

ENTRY_PREFIX = "mailbox:"
POLL_TASK = "mailbox.poll"
POLL_QUEUE = "email"
# Commands per pipeline execute: bounds the memory of one round trip.
PIPELINE_CHUNK = 20_000


class Wanted(NamedTuple):
    """What the database says a mailbox's entry should be (a tuple: a reconcile makes
    100,000 of them)."""

    account_id: int
    interval_seconds: int
    last_polled_at: datetime | None
    priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True)
class StoredEntry:
    account_id: int
    name: str
    interval: int
    last_run_at: datetime | None
    next_run_at: datetime | None


@dataclass(frozen=True)
class PollEntry:
    """What beat needs of a mailbox entry to send its poll."""

    account_id: int
    name: str
    interval: float
    options: dict[str, Any]


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0

    def add(self, other: Counts) -> None:
        self.created += other.created
        self.updated += other.updated
        self.deleted += other.deleted
        self.unchanged += other.unchanged


def celery_app() -> Celery:
    ensure_conf(app)
    return app


def client() -> redis.Redis:
    return cast(redis.Redis, get_redis(celery_app()))


def schedule_key() -> str:
    return cast(str, celery_app().redbeat_conf.schedule_key)


def entry_name(account_id: int) -> str:
    return f"{ENTRY_PREFIX}{account_id}"


def entry_key(account_id: int) -> str:
    return f"{celery_app().redbeat_conf.key_prefix}{entry_name(account_id)}"


def mailbox_key_prefix() -> str:
    """The start of every mailbox entry's key (beat tells them from its own entries)."""
    return f"{celery_app().redbeat_conf.key_prefix}{ENTRY_PREFIX}"


def pending_key(account_id: int) -> str:
    """The coalescing key of a mailbox's poll (backend/dispatch.py): while a poll of the
    mailbox waits in the queue, beat sends no other."""
    return f"poll:{account_id}"


def pending_seconds() -> float:
    """How long a poll's coalescing key lasts unless the poll starts: the broker's
    visibility timeout, after which a poll taken by a worker that died is delivered again
    anyway. A poll lost outright (Redis lost its data) blocks its mailbox no longer."""
    return float(get_settings().poll_time_limit_seconds * 2)


# Held checks (backend/push/held.py). While a watcher checks a mailbox on its held
# session, its key lives for two intervals past each check: beat then sends the
# mailbox only its safety polls. A watcher that stops checking (it died, lost the
# session, fell behind) lets the key lapse, and beat's interval applies again.
CHECKED_PREFIX = "mailbeat:held:checked:"
# Checks counted in buckets of this many seconds (capacity's rate), and in all.
CHECKS_BUCKET_SECONDS = 10
CHECKS_PREFIX = "mailbeat:held:checks:"
CHECKS_TOTAL = "mailbeat:held:checks"


def checked_key(account_id: int) -> str:
    return f"{CHECKED_PREFIX}{account_id}"


def checked_seconds(interval_seconds: float) -> int:
    """How long a check vouches for its mailbox: two intervals, plus the watcher's
    batching of what it records (a second)."""
    return math.ceil(2 * interval_seconds) + 2


def record_checks(checked: dict[int, float], now: float) -> None:
    """Checks that found nothing new: `checked` maps each mailbox to its interval. One
    pipeline: each mailbox's key renewed, the counters raised."""
    if not checked:
        return
    bucket = f"{CHECKS_PREFIX}{int(now) // CHECKS_BUCKET_SECONDS}"
    with client().pipeline(transaction=False) as pipe:
        for account_id, interval in checked.items():
            pipe.set(checked_key(account_id), 1, ex=checked_seconds(interval))
        pipe.incrby(bucket, len(checked))
        pipe.expire(bucket, 10 * CHECKS_BUCKET_SECONDS)
        pipe.incrby(CHECKS_TOTAL, len(checked))
        pipe.execute()


def forget_check(account_id: int) -> None:
    """The watcher let the mailbox go: beat's interval applies from its next run."""
    client().delete(checked_key(account_id))


def checks_per_second(window_seconds: int, now: float) -> float:
    """Held checks completed per second over the last complete buckets of the window."""
    last = int(now) // CHECKS_BUCKET_SECONDS - 1
    buckets = max(1, window_seconds // CHECKS_BUCKET_SECONDS)
    keys = [f"{CHECKS_PREFIX}{last - n}" for n in range(buckets)]
    counts = client().mget(keys)
    return sum(int(c) for c in counts if c) / (buckets * CHECKS_BUCKET_SECONDS)


# A mailbox entry's definition as RedBeat encodes it, in the field order of its `save()`
# (tests/schedules/test_service.py checks it against RedBeat's encoder). A template rather
# than json.dumps: several times faster, which counts when a reconcile compares 100,000.
# No `expires`: beat sends no poll while the mailbox's previous one waits (coalescing),
# so the queue never holds more polls than mailboxes.
_DEFINITION = (
    '{{"name": "{name}", "task": "' + POLL_TASK + '", "args": [{account_id}], "kwargs": {{}}, '
    '"options": {{"queue": "' + POLL_QUEUE + '", "priority": {priority}}}, '
    '"schedule": {{"__type__": "interval", "every": {every!r}, "relative": false}}, '
    '"enabled": true}}'
)


def definition_json(
    account_id: int, interval_seconds: int, priority: int = DEFAULT_PRIORITY
) -> str:
    """The entry's definition as RedBeat encodes it."""
    return _DEFINITION.format(
        name=entry_name(account_id),
        account_id=int(account_id),
        priority=broker_priority(priority),
        every=float(interval_seconds),
    )


def meta_json(last_run_at: datetime) -> str:
    """An entry's `meta` as RedBeat encodes it (a UTC datetime)."""
    when = last_run_at.astimezone(UTC)
    return json.dumps(
        {
            "last_run_at": {
                "__type__": "datetime",
                "year": when.year,
                "month": when.month,
                "day": when.day,
                "hour": when.hour,
                "minute": when.minute,
                "second": when.second,
                "microsecond": when.microsecond,
                "timezone": 0.0,
            }
        }
    )


def read_poll_entry(definition: str | None) -> PollEntry | None:
    """A mailbox entry's definition as beat needs it (a plain JSON parse, not RedBeat's
    entry objects); None if it is not one this module writes: missing, garbled, another
    task or kind of schedule."""
    if not definition:
        return None
    try:
        decoded = json.loads(definition)
        schedule = decoded["schedule"]
        if (
            decoded["task"] != POLL_TASK
            or schedule["__type__"] != "interval"
            or schedule.get("relative")
            or decoded.get("kwargs")
            or not decoded.get("enabled", True)
        ):
            return None
        [account_id] = decoded["args"]
        return PollEntry(
            account_id=int(account_id),
            name=str(decoded["name"]),
            interval=float(schedule["every"]),
            options=dict(decoded.get("options") or {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _same_definition(stored: str, expected: str) -> bool:
    # Written by us the strings match; anything else (another writer's field order) is
    # compared as data.
    if stored == expected:
        return True
    try:
        return bool(json.loads(stored) == json.loads(expected))
    except ValueError:
        return False


def _last_run_at(meta: str | None) -> datetime | None:
    if not meta:
        return None
    try:
        decoded = json.loads(meta, cls=RedBeatJSONDecoder)
    except ValueError:
        return None
    value = decoded.get("last_run_at")
    return value if isinstance(value, datetime) else None


def _score(last_run_at: datetime, interval_seconds: int, now: datetime) -> float:
    # RedBeat's own rule: an overdue entry is due now. The exact moment, not RedBeat's
    # whole seconds: beat sends a mailbox's poll when its score comes (beat.py).
    return max(last_run_at + timedelta(seconds=interval_seconds), now).timestamp()


Command = tuple[str, tuple[Any, ...]] | tuple[str, tuple[Any, ...], dict[str, Any]]


def _execute_chunks(conn: redis.Redis, commands: Sequence[Command]) -> list[Any]:
    results: list[Any] = []
    for start in range(0, len(commands), PIPELINE_CHUNK):
        with conn.pipeline(transaction=False) as pipe:
            for command in commands[start : start + PIPELINE_CHUNK]:
                name, args, kwargs = command[0], command[1], command[2] if len(command) > 2 else {}
                getattr(pipe, name)(*args, **kwargs)
            results.extend(pipe.execute())
    return results


def mailbox_members(conn: redis.Redis) -> dict[str, float]:
    """Every mailbox entry in the schedule's sorted set, with its score: one round trip."""
    prefix = mailbox_key_prefix()
    members = conn.zrange(schedule_key(), 0, -1, withscores=True)
    return {
        key: score
        for key, score in cast(list[tuple[str, float]], members)
        if key.startswith(prefix)
    }


# Compares entries with what they should be inside Redis and returns only those that
# need work, with what Python needs to fix them: KEYS[1] is the sorted set, then the
# entry keys; ARGV[i] the definition wanted for KEYS[i + 1] ("" when not wanted). For
# each entry to fix: its position (1-based), definition, meta and whether it is in the
# sorted set. An unchanged reconcile then moves no entry over the wire.
_CHANGED_LUA = """
local found = {}
for i = 2, #KEYS do
  local key, want = KEYS[i], ARGV[i - 1]
  local definition = redis.call('HGET', key, 'definition')
  local scored = redis.call('ZSCORE', KEYS[1], key) and 1 or 0
  if (want ~= '' and (definition ~= want or scored == 0))
      or (want == '' and (scored == 1 or redis.call('EXISTS', key) == 1)) then
    found[#found + 1] = i - 1
    found[#found + 1] = definition
    found[#found + 1] = redis.call('HGET', key, 'meta')
    found[#found + 1] = scored
  end
end
return found
"""
# Entries compared per script call: Redis runs a script alone, so each call stays short
# (a few milliseconds).
CHECK_CHUNK = 5_000


def _changed(
    conn: redis.Redis, keys: Sequence[str], expected: Mapping[str, str]
) -> list[tuple[str, str | None, str | None, bool]]:
    """The entries under `keys` that differ from `expected` (a key missing from it is
    not wanted), as (key, definition, meta, in the sorted set)."""
    script = conn.register_script(_CHANGED_LUA)
    zset = schedule_key()
    changed = []
    for start in range(0, len(keys), CHECK_CHUNK):
        chunk = keys[start : start + CHECK_CHUNK]
        found = script(keys=[zset, *chunk], args=[expected.get(key, "") for key in chunk])
        for index in range(0, len(found), 4):
            position, definition, meta, scored = found[index : index + 4]
            changed.append((chunk[position - 1], definition, meta, bool(scored)))
    return changed


def apply(
    wanted: Mapping[int, Wanted],
    check_keys: Iterable[str],
    now: datetime,
    *,
    first_poll_now: bool = False,
) -> Counts:
    """Make the entries under `check_keys` match `wanted`: an entry wanted but missing is
    created, one whose definition differs (or which fell out of the sorted set) is
    rewritten in place keeping its `last_run_at`, one not wanted is deleted.

    `first_poll_now`: a new entry for a mailbox never polled is due at once (an account
    just created); otherwise new entries are spread over their interval (a rebuild of
    thousands must not fire in the same second).

    The comparison runs in Redis (one script call per CHECK_CHUNK entries, returning only
    the entries to fix), then one round trip writes, with as few commands as possible:
    one HSET per changed entry and a single ZADD / ZREM / DEL for all of them.
    """
    conn = client()
    zset = schedule_key()
    prefix = mailbox_key_prefix()
    by_key = {f"{prefix}{account_id}": want for account_id, want in wanted.items()}
    expected = {
        key: definition_json(want.account_id, want.interval_seconds, want.priority)
        for key, want in by_key.items()
    }
    keys = sorted(set(by_key) | set(check_keys))
    counts = Counts(unchanged=len(by_key))
    writes: list[Command] = []
    new_scores: dict[str, float] = {}
    gone: list[str] = []
    for key, definition, meta, scored in _changed(conn, keys, expected):
        want = by_key.get(key)
        if want is None:
            gone.append(key)
            counts.deleted += 1
            continue
        if definition is not None and scored and _same_definition(definition, expected[key]):
            continue  # the same data in another writer's field order
        counts.unchanged -= 1
        if definition is None:
            counts.created += 1
        else:
            counts.updated += 1
        last_run_at = _last_run_at(meta)
        fields = {"definition": expected[key]}
        if last_run_at is None:
            last_run_at = initial_last_run(
                want.account_id,
                want.interval_seconds,
                want.last_polled_at,
                now,
                first_poll_now=first_poll_now,
            )
            if definition is None:
                fields["meta"] = meta_json(last_run_at)
            else:
                # NX: beat may have just sent this entry and written its own meta.
                writes.append(("hsetnx", (key, "meta", meta_json(last_run_at))))
        writes.append(("hset", (key,), {"mapping": fields}))
        new_scores[key] = _score(last_run_at, want.interval_seconds, now)
    if new_scores:
        writes.append(("zadd", (zset, new_scores)))
    if gone:
        writes += [("zrem", (zset, *gone)), ("delete", tuple(gone))]
    if writes:
        _execute_chunks(conn, writes)
    return counts


def apply_pages(
    pages: Iterable[Mapping[int, Wanted]], members: Iterable[str], now: datetime
) -> Counts:
    """Reconcile: make every mailbox entry match the database, page by page (`pages`,
    the wanted accounts as the database streams them), then delete the entries of
    `members` (the sorted set, read by the caller before the database) that no page
    wanted. Memory stays at one page of entries, whatever the number of accounts. An
    entry created while this runs (an account added) is not among `members`, so never
    taken for an orphan."""
    counts = Counts()
    seen: set[str] = set()
    prefix = mailbox_key_prefix()
    for page in pages:
        seen.update(f"{prefix}{account_id}" for account_id in page)
        counts.add(apply(page, [], now))
    orphans = [key for key in members if key not in seen]
    if orphans:
        counts.add(apply({}, orphans, now))
    return counts


def read_entries() -> list[StoredEntry]:
    """Every mailbox entry with its last and next run, sorted by account id."""
    conn = client()
    members = mailbox_members(conn)
    keys = list(members)
    stored = _execute_chunks(conn, [("hmget", (key, "definition", "meta")) for key in keys])
    entries = []
    prefix = mailbox_key_prefix()
    for key, (definition, meta) in zip(keys, stored, strict=True):
        try:
            account_id = int(key[len(prefix) :])
        except ValueError:
            log.warning("schedule entry %s cannot be read; reconcile will replace it", key)
            continue
        entry = _stored_entry(account_id, definition, meta)
        if entry is not None:
            entries.append(entry)
    entries.sort(key=lambda entry: entry.account_id)
    return entries


def read_entries_of(account_ids: Sequence[int]) -> list[StoredEntry]:
    """The entries of these mailboxes that the schedule holds, in the order given: one
    pipelined round trip (an HMGET and a ZSCORE each), whatever the schedule's size."""
    conn = client()
    zset = schedule_key()
    commands: list[Command] = []
    for account_id in account_ids:
        key = entry_key(account_id)
        commands += [("hmget", (key, "definition", "meta")), ("zscore", (zset, key))]
    replies = _execute_chunks(conn, commands)
    entries = []
    for account_id, (definition, meta), score in zip(
        account_ids, replies[0::2], replies[1::2], strict=True
    ):
        entry = None if score is None else _stored_entry(account_id, definition, meta)
        if entry is not None:
            entries.append(entry)
    return entries


def count_entries() -> int:
    """The mailbox entries in the schedule: the sorted set's size less beat's static
    entries it holds. No member is read, so it costs the same at any size."""
    zset = schedule_key()
    statics = [f"{celery_app().redbeat_conf.key_prefix}{name}" for name in app.conf.beat_schedule]
    with client().pipeline(transaction=False) as pipe:
        pipe.zcard(zset)
        for key in statics:
            pipe.zscore(zset, key)
        size, *scores = pipe.execute()
    return int(size) - sum(score is not None for score in scores)


def _stored_entry(account_id: int, definition: str | None, meta: str | None) -> StoredEntry | None:
    if not definition:
        return None
    try:
        interval = int(json.loads(definition)["schedule"]["every"])
    except (ValueError, KeyError, TypeError):
        log.warning("schedule entry %s cannot be read; reconcile will replace it", account_id)
        return None
    last_run_at = _last_run_at(meta)
    next_run_at = None if last_run_at is None else last_run_at + timedelta(seconds=interval)
    return StoredEntry(
        account_id=account_id,
        name=entry_name(account_id),
        interval=interval,
        last_run_at=last_run_at,
        next_run_at=next_run_at,
    )


def delete(account_id: int) -> None:
    key = entry_key(account_id)
    with client().pipeline(transaction=False) as pipe:
        pipe.zrem(schedule_key(), key)
        pipe.delete(key)
        pipe.execute()
