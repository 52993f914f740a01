"""The Celery app: `celery -A backend.celery_app worker|beat|flower`.

Settings follow docs/architecture.md's settled choices; each comment says what goes wrong
without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from celery import Celery
from celery.signals import after_setup_logger
from kombu import transport as kombu_transports
from kombu.connection import Connection
from kombu.entity import Queue
from kombu.transport import redis as kombu_redis

from backend import redis
from backend.config import get_settings

settings = get_settings()

# mailbeat's priorities run 0-9, higher more urgent (an account's `priority`; a poll asked
# for by hand goes at TOP_PRIORITY). Kombu's Redis transport keeps one list per level and
# pops the LOWEST level first, so a mailbeat priority p travels as 9 - p. A message sent
# without a priority would land on kombu's level 0, ahead of everything: the route of
# the polls below sets DEFAULT_PRIORITY's level. (Other queues use one level.)
DEFAULT_PRIORITY = 5
TOP_PRIORITY = 9
PRIORITY_LEVELS = range(10)
QUEUE_SEPARATOR = ":"


def broker_priority(priority: int) -> int:
    """The kombu priority that carries a mailbeat priority (0-9, higher more urgent)."""
    return TOP_PRIORITY - max(0, min(TOP_PRIORITY, priority))


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's messages: one per priority level, the first
    (kombu level 0, mailbeat's most urgent) under the queue's own name."""
    return [queue] + [f"{queue}{QUEUE_SEPARATOR}{level}" for level in PRIORITY_LEVELS if level]


# Outlasts a tick's sleep (1 s) plus one Redis call stuck until its socket timeout.
BEAT_LOCK_SECONDS = int(settings.redis_socket_timeout) + 5
# How often old poll runs are pruned (POLL_RUN_RETENTION_DAYS): up to 3 million an
# hour (backend/mailbox/polling.py), against 1.2 million new ones an hour at 100,000
# mailboxes every 5 minutes.
PRUNE_SECONDS = 600
# How often beat sends the audits due and checks freshness.
AUDIT_TICK_SECONDS = 60
FRESHNESS_CHECK_SECONDS = 60


class SentinelChannel(kombu_redis.SentinelChannel):
    """Kombu's Sentinel channel, but one closed after its connection was let go raises a
    connection error, not an AttributeError. A worker that loses the broker (a failover)
    closes its connection, then its channel, which puts the tasks it holds back in their
    queue and needs the connection's address for that: kombu's AttributeError ends the
    worker, while a connection error is ignored there and the worker reconnects (the
    tasks come back after the visibility timeout instead)."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.RedisConnectionError("the broker connection is closed")
        return cast(dict[str, Any], super()._connparams(asynchronous))


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


# sentinel:// URLs use it, also after kombu moves on to the next sentinel's address.
kombu_transports.TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"

# A bad REDIS_URL (or Sentinel without REDIS_SENTINEL_MASTER) stops every process here,
# as it starts, saying what to fix.
redis.check_settings(settings)
app = Celery("mailbeat", broker=redis.broker_url(settings.redis_url))
app.conf.update(
    timezone="UTC",
    enable_utc=True,
    # Outcomes are written to SQL; a result backend would only grow in Redis.
    task_ignore_result=True,
    result_backend=None,
    # A poll killed mid-way is redelivered, not lost; one task at a time per process so
    # a long poll does not sit on prefetched polls for other mailboxes, and so a worker
    # takes the most urgent queued poll when it is free rather than one it reserved before.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Redis redelivers unacked tasks after this; it must outlast the longest poll.
    broker_transport_options={
        "visibility_timeout": settings.poll_time_limit_seconds * 2,
        "socket_timeout": settings.redis_socket_timeout,
        "socket_connect_timeout": settings.redis_socket_timeout,
        # Ten levels, one list each, so every mailbeat priority is its own level
        # (kombu's default folds them into four); a readable separator in the key names.
        "priority_steps": list(PRIORITY_LEVELS),
        "sep": QUEUE_SEPARATOR,
        # Sentinel: the master's name and the sentinels' timeouts (kombu and Flower).
        **redis.broker_transport_options(settings.redis_url),
    },
    broker_connection_retry_on_startup=True,
    # Flower sees every task only with events on.
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_queues=(Queue("email"), Queue("workflow"), Queue("default")),
    task_default_queue="default",
    task_routes={
        # A poll sent without a priority of its own counts as DEFAULT_PRIORITY, not as
        # kombu's level 0 (mailbeat's most urgent).
        "mailbox.*": {"queue": "email", "priority": broker_priority(DEFAULT_PRIORITY)},
        # A backfill fetches and stores as a poll does: beside the polls.
        "backfill.*": {"queue": "email", "priority": broker_priority(DEFAULT_PRIORITY)},
        # So does an audit's repair; its schedule and the freshness check stay on default.
        "audit.run": {"queue": "email", "priority": broker_priority(DEFAULT_PRIORITY)},
        "message.*": {"queue": "workflow"},
        "webhook.*": {"queue": "workflow"},
    },
    # A poll's limits sit above the IMAP timeouts: IMAP notices a stuck server first, the
    # soft limit lets a hung poll record its failure, the hard limit kills it.
    task_annotations={
        "mailbox.poll": {
            "soft_time_limit": settings.poll_soft_time_limit_seconds,
            "time_limit": settings.poll_time_limit_seconds,
        }
    },
    # RedBeat (with mailbeat's reconcile on top, backend/schedules/beat.py): its own
    # Redis (the client set below); a tick of ~1 s keeps dispatch lateness low. The lock is
    # renewed every tick and while a long dispatch runs, so it can be short: a beat that
    # dies (SIGKILL, a lost host) is replaced within BEAT_LOCK_SECONDS, not minutes.
    beat_scheduler="backend.schedules.beat:MailbeatScheduler",
    # Only shown in beat's banner (RedBeat is handed its client): where, without secrets.
    redbeat_redis_url=redis.location(settings.effective_redbeat_redis_url),
    redbeat_redis_options={},  # unused: RedBeat is handed its client (end of this file)
    redbeat_key_prefix="redbeat:",
    redbeat_lock_timeout=BEAT_LOCK_SECONDS,
    beat_max_loop_interval=1,
    beat_schedule={
        # The database is the truth: beat rebuilds the schedule from it now and then,
        # which also repairs an entry whose update after a commit failed.
        "schedules.reconcile": {
            "task": "schedules.reconcile",
            "schedule": settings.reconcile_interval_seconds,
            "options": {"expires": settings.reconcile_interval_seconds},
        },
        # Objects that fell back to local files while S3 was down go up once it answers;
        # deleted accounts' objects that their deletion could not remove go.
        "storage-sync": {
            "task": "storage.sync",
            "schedule": settings.storage_sync_interval_seconds,
            "options": {"expires": settings.storage_sync_interval_seconds},
        },
        # Processing and deliveries whose task was lost (Redis flushed, a worker killed).
        "processing-sweep": {
            "task": "message.sweep",
            "schedule": settings.processing_sweep_interval_seconds,
            "options": {"expires": settings.processing_sweep_interval_seconds},
        },
        # Polls whose worker died: their runs closed, their mailboxes polled again, within
        # a lease and half of one (backend/mailbox/polling.py).
        "poll-runs-sweep": {
            "task": "poll_runs.sweep",
            "schedule": settings.mailbox_lease_seconds / 2,
            "options": {"expires": settings.mailbox_lease_seconds / 2},
        },
        # Poll runs past POLL_RUN_RETENTION_DAYS.
        "poll-runs-prune": {
            "task": "poll_runs.prune",
            "schedule": PRUNE_SECONDS,
            "options": {"expires": PRUNE_SECONDS},
        },
        # The audits now due, spread over AUDIT_INTERVAL_SECONDS (backend/audit/service.py).
        "audit-schedule": {
            "task": "audit.schedule",
            "schedule": AUDIT_TICK_SECONDS,
            "options": {"expires": AUDIT_TICK_SECONDS},
        },
        # Mailboxes that turned stale or fresh: account.stale / account.fresh.
        "freshness-check": {
            "task": "freshness.check",
            "schedule": FRESHNESS_CHECK_SECONDS,
            "options": {"expires": FRESHNESS_CHECK_SECONDS},
        },
    },
    imports=(
        "backend.processing.tasks",
        "backend.storage.tasks",
        "backend.webhooks.tasks",
        "backend.mailbox.tasks",
        "backend.schedules.tasks",
        "backend.audit.tasks",
    ),
)

# RedBeat uses the client it finds here instead of building its own, so the schedule's
# Redis has the same timeouts and health checks as every other client (backend/redis.py).
# RedBeat reads keys and JSON as text, so this client decodes.
app.redbeat_redis = redis.connect(settings.effective_redbeat_redis_url, decode_responses=True)


@contextmanager
def broker_connection(timeout: float) -> Iterator[Connection]:
    """A connection from the shared broker pool, waiting at most `timeout` seconds for one
    (kombu's default is to wait forever), for control commands (inspect, ping)."""
    # Control commands then publish on this connection. Through the producer pool they
    # would take a second pool connection with no timeout, and callers holding one each
    # would wait for each other forever once the pool is exhausted.
    app.control.mailbox.producer_pool = None
    connection = app.pool.acquire(block=True, timeout=timeout)
    try:
        yield connection
    finally:
        connection.release()


@after_setup_logger.connect
def _log_level(logger: logging.Logger, loglevel: int, **_: Any) -> None:
    """`celery worker`'s -l defaults to WARNING, which hides the one INFO line per poll:
    LOG_LEVEL applies too, and the more verbose of the two wins."""
    wanted = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    logger.setLevel(min(loglevel, wanted))
