"""The one seam between "this should run" and where it runs: a Celery task sent by name,
or the same function called in this process (local mode, no Redis).

    dispatch.enqueue("webhook.deliver", delivery_id, countdown=30)

Call `enqueue` only once the work it refers to is committed: after the `session_scope`
(or the request's commit) that wrote it has exited. A worker may pick the task up at
once, and it must find the rows; a task sent from inside a transaction that then rolls
back would run against nothing.

The mode ("celery" or "local") is decided once per process: pinned by the process
itself (Celery workers and beat), from SCHEDULER_MODE, or, with SCHEDULER_MODE=auto, by
asking Redis once. The schedule (backend/schedules/service.py) follows the same mode.

Services never import their own tasks module: they enqueue by name, and register the
plain function that name runs for local mode (`register`). The Celery task of the same
name (backend/<domain>/tasks.py) calls that function too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from celery.signals import task_prerun

from backend import redis
from backend.celery_app import app as celery_app
from backend.celery_app import broker_priority
from backend.config import get_settings
from backend.models.enums import SchedulerMode

log = logging.getLogger(__name__)

# How long a coalescing key outlives the task's countdown: a worker that died before
# starting the task cannot block its key for longer than this.
COALESCE_EXPIRY_SECONDS = 600.0
COALESCE_PREFIX = "mailbeat:pending:"
# The message header that carries the coalescing key to the worker.
COALESCE_HEADER = "mailbeat_coalesce_key"

TaskFunction = Callable[..., object]

_functions: dict[str, TaskFunction] = {}
_celery_process = False
_in_process = False
_local_pending: dict[str, float] = {}  # coalescing key -> monotonic expiry, local mode
_local_guard = threading.Lock()


# -- the mode ------------------------------------------------------------------------


def redis_reachable(timeout: float) -> bool:
    try:
        with redis.probe(timeout) as conn:
            return bool(conn.ping())
    except redis.RedisError:
        return False


def assume_celery_mode() -> None:
    """Celery workers and beat run only with Redis: they never take the local mode, even
    if Redis blinks when they first ask."""
    global _celery_process  # noqa: PLW0603 - a fact about this process
    _celery_process = True
    mode.cache_clear()


def run_in_process() -> None:
    """Run every task in this process from now on, whatever the mode: for `cli poll`,
    which hands a poll on without needing Celery workers (its schedule and lock still
    follow the mode)."""
    global _in_process  # noqa: PLW0603 - a fact about this process
    _in_process = True


@lru_cache
def mode() -> SchedulerMode:
    """ "celery" or "local", decided once per process (SCHEDULER_MODE=auto asks Redis)."""
    settings = get_settings()
    if _celery_process:
        return SchedulerMode.CELERY
    if settings.scheduler_mode != "auto":
        return SchedulerMode(settings.scheduler_mode)
    url = redis.location()
    if redis_reachable(settings.redis_socket_timeout):
        log.info("scheduler: Redis at %s answers: polls run on Celery workers", url)
        return SchedulerMode.CELERY
    log.warning(
        "scheduler: Redis at %s cannot be reached: running the local in-process scheduler "
        "(polls run in this process; start Redis and restart to use Celery workers)",
        url,
    )
    return SchedulerMode.LOCAL


def reset() -> None:
    """Forget the mode and everything pending in this process (tests change settings)."""
    global _celery_process, _in_process  # noqa: PLW0603 - facts about this process
    _celery_process = _in_process = False
    mode.cache_clear()
    with _local_guard:
        _local_pending.clear()


# -- sending -------------------------------------------------------------------------


def register(name: str, function: TaskFunction) -> None:
    """The function the task `name` runs, for local mode: the same one its Celery task
    calls. Registered by the module that defines it, when it is imported."""
    _functions[name] = function


def enqueue(
    name: str,
    *args: Any,
    countdown: float | None = None,
    priority: int | None = None,
    coalesce_key: str | None = None,
    coalesce_expiry: float = COALESCE_EXPIRY_SECONDS,
    headers: Mapping[str, Any] | None = None,
) -> str | None:
    """Run the task `name` with `args` (JSON-serialisable), once what it reads is
    committed. Returns its task id, or None when coalesced away.

    countdown: seconds to wait first (in local mode, on a timer thread).
    priority: 0-9, higher is more urgent (broker_priority in backend/celery_app.py turns
    it into kombu's level); without one, the task's route decides. Local mode ignores it.
    coalesce_key: at most one pending task per key; an enqueue while one is pending
    (sent, not yet started) is dropped. The task frees the key as it starts; the key
    expires by itself `coalesce_expiry` seconds after the countdown, so a task lost with
    its worker cannot block it for ever.
    headers: extra message headers for whoever reads the queue (Celery mode only).

    The queue follows from the name (task_routes in backend/celery_app.py). In Celery
    mode a Redis failure raises to the caller, as sending any task does."""
    expiry = (countdown or 0.0) + coalesce_expiry
    if _in_process or mode() == SchedulerMode.LOCAL:
        function = _registered(name)
        if coalesce_key is not None and not _claim_local(coalesce_key, expiry):
            return None
        return _run_local(name, function, args, countdown, coalesce_key)
    if coalesce_key is not None and not _claim_redis(coalesce_key, expiry):
        return None
    options: dict[str, Any] = {}
    if countdown:
        options["countdown"] = countdown
    if priority is not None:
        options["priority"] = broker_priority(priority)
    if headers or coalesce_key is not None:
        options["headers"] = dict(headers or {})
        if coalesce_key is not None:
            options["headers"][COALESCE_HEADER] = coalesce_key
    result = celery_app.send_task(name, args=list(args), **options)
    return str(result.id)


# -- coalescing ----------------------------------------------------------------------


def _claim_redis(key: str, expiry: float) -> bool:
    milliseconds = max(1, round(expiry * 1000))
    return bool(redis.shared().set(COALESCE_PREFIX + key, 1, nx=True, px=milliseconds))


def claim_many(keys: Sequence[str], expiry: float) -> list[bool]:
    """Claim coalescing keys in one round trip (Celery mode): for each key, whether it
    was free and is now taken. For a sender that adds the COALESCE_HEADER itself (beat,
    which sends hundreds of polls in one tick)."""
    milliseconds = max(1, round(expiry * 1000))
    with redis.shared().pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.set(COALESCE_PREFIX + key, 1, nx=True, px=milliseconds)
        return [bool(reply) for reply in pipe.execute()]


def ages(keys: Sequence[str], expiry: float) -> list[float | None]:
    """How long ago each of these coalescing keys was claimed with `expiry` (Celery mode),
    from what is left of it; None where it is gone."""
    with redis.shared().pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.pttl(COALESCE_PREFIX + key)
        left = pipe.execute()
    return [expiry - int(ms) / 1000 if int(ms) >= 0 else None for ms in left]


def retake(keys: Sequence[str], expiry: float) -> list[bool]:
    """Claim these coalescing keys anew whatever holds them (their task is known to be
    lost): for each, whether it is now taken."""
    milliseconds = max(1, round(expiry * 1000))
    with redis.shared().pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.delete(COALESCE_PREFIX + key)
            pipe.set(COALESCE_PREFIX + key, 1, nx=True, px=milliseconds)
        replies = pipe.execute()
    return [bool(reply) for reply in replies[1::2]]


def release(key: str) -> None:
    """Free a coalescing key: the task it stood for will not run (or has started)."""
    if _in_process or mode() == SchedulerMode.LOCAL:
        with _local_guard:
            _local_pending.pop(key, None)
        return
    redis.shared().delete(COALESCE_PREFIX + key)


def _claim_local(key: str, expiry: float) -> bool:
    now = time.monotonic()
    with _local_guard:
        if _local_pending.get(key, 0.0) > now:
            return False
        _local_pending[key] = now + expiry
        return True


def _started(task: Any = None, **_kwargs: Any) -> None:
    """In the worker, as a task starts: free its coalescing key, so that work arriving
    from now on is sent again rather than assumed to be covered by this run."""
    key = getattr(task.request, COALESCE_HEADER, None) if task is not None else None
    if key:
        try:
            release(str(key))
        except redis.RedisError:
            log.warning("coalescing key %s not freed; it expires by itself", key)


task_prerun.connect(_started)


# -- local mode ----------------------------------------------------------------------


def _registered(name: str) -> TaskFunction:
    try:
        return _functions[name]
    except KeyError:
        raise LookupError(f"no function registered for task {name!r} (local mode)") from None


def _run_local(
    name: str,
    function: TaskFunction,
    args: tuple[Any, ...],
    countdown: float | None,
    coalesce_key: str | None,
) -> str:
    task_id = str(uuid.uuid4())
    if countdown:
        timer = threading.Timer(countdown, _call, args=(name, function, args, coalesce_key))
        timer.daemon = True
        timer.start()
    else:
        _call(name, function, args, coalesce_key)
    return task_id


def _call(
    name: str, function: TaskFunction, args: tuple[Any, ...], coalesce_key: str | None
) -> None:
    """A task run in this process, as a worker would run it: its failure is logged, never
    raised to whoever enqueued it (the sweep picks up work left undone)."""
    if coalesce_key is not None:
        release(coalesce_key)
    try:
        function(*args)
    except Exception:
        log.exception("task %s%r failed", name, args)
