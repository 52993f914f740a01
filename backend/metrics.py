"""Prometheus metrics.

Poll numbers are recorded by whichever process polls (Celery workers, the local scheduler,
the CLI) through prometheus-client's multiprocess mode: each process writes its own mmap
files under one directory and `/metrics` merges them, so workers' polls show up in the
API's scrape. Gauges that describe the state (mailboxes by status, ingestion lag, queue
lengths, schedule entries) are computed at scrape time from the database and Redis.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    values,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from backend import redis
from backend.audit import freshness
from backend.celery_app import app, queue_keys
from backend.config import get_settings
from backend.db import get_sessionmaker, session_scope
from backend.mailbox import budget
from backend.models import Account, AccountStatus, PollOutcome, utcnow
from backend.processing import quarantine
from backend.push import leases as push_leases
from backend.schedules import service as schedules
from backend.singleflight import SharedResult

log = logging.getLogger(__name__)

POLL_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def multiproc_dir() -> Path:
    path = get_settings().effective_prometheus_multiproc_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class _PollMetrics:
    polls: Counter
    messages: Counter
    bytes: Counter
    duration: Histogram


@lru_cache
def _poll_metrics() -> _PollMetrics:
    path = multiproc_dir()
    # prometheus-client finds its multiprocess directory only in this variable, read when
    # a metric's value is created; setting it here keeps the setting in Settings.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # The mmap files are named after the process. A pid alone repeats across containers
    # sharing this directory (every worker container has a pid 8), so two processes would
    # write one file and lose counts: the host name goes in too.
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=lambda: f"{socket.gethostname()}-{os.getpid()}"
    )
    metrics = _PollMetrics(
        polls=Counter(
            "mailbeat_polls",
            "Mailbox polls finished, by outcome.",
            ["outcome"],
            registry=None,
        ),
        messages=Counter("mailbeat_messages_ingested", "Messages stored by polls.", registry=None),
        bytes=Counter(
            "mailbeat_bytes_ingested", "Raw message bytes stored by polls.", registry=None
        ),
        duration=Histogram(
            "mailbeat_poll_duration_seconds",
            "How long a poll took, by outcome.",
            ["outcome"],
            buckets=POLL_DURATION_BUCKETS,
            registry=None,
        ),
    )
    # Every outcome shows from the start (at 0), so rate() and alerts work before the first.
    for outcome in PollOutcome:
        if outcome != PollOutcome.RUNNING:
            metrics.polls.labels(outcome=outcome)
    return metrics


def record_poll(outcome: str, messages: int, bytes_: int, duration_seconds: float) -> None:
    """Count one finished poll. Never raises: a metrics problem must not fail a poll."""
    try:
        metrics = _poll_metrics()
        metrics.polls.labels(outcome=outcome).inc()
        if messages:
            metrics.messages.inc(messages)
        if bytes_:
            metrics.bytes.inc(bytes_)
        metrics.duration.labels(outcome=outcome).observe(max(duration_seconds, 0.0))
    except Exception:
        log.exception("could not record poll metrics")


PUSH_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300)


@dataclass(frozen=True)
class _PushMetrics:
    connections: Gauge
    polls: Counter
    news_to_stored: Histogram


@lru_cache
def _push_metrics() -> _PushMetrics:
    _poll_metrics()  # the multiprocess directory and file naming, set up once
    return _PushMetrics(
        # Summed over the live watchers; a watcher zeroes its own as it stops.
        connections=Gauge(
            "mailbeat_push_connections",
            "IDLE connections held by watchers (by IMAP host with METRICS_HOST_LABEL on).",
            ["host"],
            registry=None,
            multiprocess_mode="livesum",
        ),
        polls=Counter(
            "mailbeat_push_polls",
            "Polls sent because a server reported news (IDLE); coalesced ones not counted.",
            registry=None,
        ),
        news_to_stored=Histogram(
            "mailbeat_push_news_to_stored_seconds",
            "From the server's news (EXISTS) to its messages stored, for push polls.",
            buckets=PUSH_BUCKETS,
            registry=None,
        ),
    )


@dataclass(frozen=True)
class _HeldMetrics:
    checks: Counter
    changes: Counter


@lru_cache
def _held_metrics() -> _HeldMetrics:
    _poll_metrics()  # the multiprocess directory and file naming, set up once
    return _HeldMetrics(
        checks=Counter(
            "mailbeat_held_checks",
            "Checks on a watcher's held session that found nothing new (idle polls "
            "without a task).",
            registry=None,
        ),
        changes=Counter(
            "mailbeat_held_changes",
            "Checks on a held session that found something new and sent a poll.",
            registry=None,
        ),
    )


def record_held_checks(unchanged: int, *, changed: int = 0) -> None:
    try:
        metrics = _held_metrics()
        if unchanged:
            metrics.checks.inc(unchanged)
        if changed:
            metrics.changes.inc(changed)
    except Exception:
        log.exception("could not record held check metrics")


def set_push_connections(by_host: Mapping[str, int]) -> None:
    """The connections this watcher holds now, by host (hosts it left at 0)."""
    try:
        gauge = _push_metrics().connections
        for host, count in by_host.items():
            gauge.labels(host=host).set(count)
    except Exception:
        log.exception("could not record push metrics")


def record_push_poll() -> None:
    try:
        _push_metrics().polls.inc()
    except Exception:
        log.exception("could not record push metrics")


def record_news_stored(seconds: float) -> None:
    try:
        _push_metrics().news_to_stored.observe(max(seconds, 0.0))
    except Exception:
        log.exception("could not record push metrics")


@dataclass(frozen=True)
class _AuditMetrics:
    messages_missing: Counter
    messages_repaired: Counter
    objects_missing: Counter
    objects_repaired: Counter


@lru_cache
def _audit_metrics() -> _AuditMetrics:
    _poll_metrics()  # the multiprocess directory and file naming, set up once
    return _AuditMetrics(
        messages_missing=Counter(
            "mailbeat_audit_messages_missing",
            "Messages audits found missing (on the server, not stored).",
            registry=None,
        ),
        messages_repaired=Counter(
            "mailbeat_audit_messages_repaired",
            "Missing messages audits stored again.",
            registry=None,
        ),
        objects_missing=Counter(
            "mailbeat_audit_objects_missing",
            "Stored objects audits found missing (or altered: deep audits).",
            registry=None,
        ),
        objects_repaired=Counter(
            "mailbeat_audit_objects_repaired",
            "Objects audits wrote back, byte for byte.",
            registry=None,
        ),
    )


def record_audit(
    *, missing: int, repaired: int, objects_missing: int, objects_repaired: int
) -> None:
    """Count what an audit found and repaired. Never raises."""
    try:
        metrics = _audit_metrics()
        metrics.messages_missing.inc(missing)
        metrics.messages_repaired.inc(repaired)
        metrics.objects_missing.inc(objects_missing)
        metrics.objects_repaired.inc(objects_repaired)
    except Exception:
        log.exception("could not record audit metrics")


def _database_gauges() -> Iterator[GaugeMetricFamily]:
    with get_sessionmaker()() as session:
        counts = dict(
            session.execute(select(Account.status, func.count()).group_by(Account.status)).all()
        )
        # A mailbox never polled successfully has been waiting since it was created.
        oldest = session.scalar(
            select(func.min(func.coalesce(Account.last_success_at, Account.created_at))).where(
                Account.enabled.is_(True)
            )
        )
        stale = freshness.staleness(session).stale
        quarantined = quarantine.count(session)
    by_status = GaugeMetricFamily("mailbeat_mailboxes", "Mailboxes by status.", labels=["status"])
    for status in sorted(set(AccountStatus) | set(counts)):
        by_status.add_metric([status], counts.get(status, 0))
    yield by_status
    lag = 0.0
    if oldest is not None:
        lag = max((utcnow() - oldest).total_seconds(), 0.0)
    yield GaugeMetricFamily(
        "mailbeat_ingestion_lag_seconds",
        "Age of the oldest last successful poll among enabled mailboxes (0 when none).",
        value=lag,
    )
    yield GaugeMetricFamily(
        "mailbeat_mailboxes_stale",
        "Scheduled mailboxes with no complete poll within their freshness limit.",
        value=stale,
    )
    yield GaugeMetricFamily(
        "mailbeat_messages_quarantined",
        "Messages whose processing failed MAX_PROCESS_FAILURES times, waiting for a replay.",
        value=quarantined,
    )


def _redis_gauges() -> Iterator[GaugeMetricFamily]:
    names = [queue.name for queue in app.conf.task_queues]
    with redis.probe() as client:
        pipe = client.pipeline(transaction=False)
        for name in names:
            for key in queue_keys(name):
                pipe.llen(key)
        lengths = iter(pipe.execute())
    family = GaugeMetricFamily(
        "mailbeat_queue_length", "Tasks waiting in each Celery queue.", labels=["queue"]
    )
    for name in names:
        family.add_metric([name], sum(int(next(lengths)) for _ in queue_keys(name)))
    yield family


def _schedule_gauges() -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily(
        "mailbeat_schedule_entries",
        "Mailbox entries in the schedule (RedBeat, or the local scheduler in local mode).",
        value=schedules.count_entries(),
    )


def _capacity_gauges() -> Iterator[GaugeMetricFamily]:
    with session_scope() as session:
        result = schedules.capacity(session)
    yield GaugeMetricFamily(
        "mailbeat_polls_demanded_per_second",
        "Polls per second the schedule asks for: the sum of 1/interval over its mailboxes.",
        value=result.demanded_polls_per_second,
    )
    yield GaugeMetricFamily(
        "mailbeat_polls_completed_per_second",
        "Polls finished per second over the last minute.",
        value=result.completed_polls_per_second,
    )
    yield GaugeMetricFamily(
        "mailbeat_held_checks_completed_per_second",
        "Checks on watchers' held sessions that found nothing new, per second over the "
        "last minute.",
        value=result.completed_checks_per_second,
    )
    yield GaugeMetricFamily(
        "mailbeat_poll_queue_oldest_seconds",
        "How long the oldest queued poll has waited (0 when none waits).",
        value=result.oldest_pending_seconds or 0.0,
    )
    yield GaugeMetricFamily(
        "mailbeat_poll_interval_stretch",
        "Demanded / completed polls per second, at least 1: how much longer every "
        "interval really is (1 when nothing completed yet).",
        value=result.interval_stretch or 1.0,
    )


def _budget_gauges() -> Iterator[GaugeMetricFamily]:
    held, throttled = budget.usage()
    labels = ["host"] if get_settings().metrics_host_label else []
    slots = GaugeMetricFamily(
        "mailbeat_connection_slots",
        "IMAP connections holding a slot in the connection budget, every process together"
        + (", by host." if labels else "."),
        labels=labels,
    )
    if labels:
        for host, count in sorted(held.items()):
            slots.add_metric([host], count)
    else:
        slots.add_metric([], sum(held.values()))
    yield slots
    yield GaugeMetricFamily(
        "mailbeat_hosts_throttled",
        "IMAP hosts given one connection at a time after a throttle answer.",
        value=len(throttled),
    )


# Each source of scrape-time gauges; one that fails is reported down, the rest still show.
STATE_SOURCES: dict[str, Callable[[], Iterator[GaugeMetricFamily]]] = {
    "database": _database_gauges,
    "redis": _redis_gauges,
    "schedule": _schedule_gauges,
    "capacity": _capacity_gauges,
    "budget": _budget_gauges,
}


def state_families() -> list[Metric]:
    """The scrape-time gauges of every source, and whether each could be read."""
    up = GaugeMetricFamily(
        "mailbeat_metrics_source_up",
        "1 when the scrape could read this source, 0 when it failed.",
        labels=["source"],
    )
    found: list[Metric] = []
    for name, source in STATE_SOURCES.items():
        try:
            families = list(source())
        except Exception as exc:
            log.warning("metrics: %s unavailable: %s", name, type(exc).__name__)
            up.add_metric([name], 0)
            continue
        up.add_metric([name], 1)
        found.extend(families)
    return [*found, up]


# Before there is any result, a scrape waits this long for the computation in flight,
# then answers with the counters only: Prometheus's default scrape timeout.
FIRST_SCRAPE_WAIT_SECONDS = 10.0


class StateCache:
    """/metrics may answer without a token: its database queries and Redis pipeline run
    at most once per METRICS_CACHE_SECONDS, one computation shared by all scrapes
    (four unauthenticated scrape loops used to raise the API's p95 from 35 to 84 ms)."""

    def __init__(self) -> None:
        self._shared = SharedResult(
            state_families,
            fresh_seconds=lambda: get_settings().metrics_cache_seconds,
            wait_seconds=lambda: FIRST_SCRAPE_WAIT_SECONDS,
        )

    def families(self) -> list[Metric]:
        return self._shared.get() or []


# prometheus-client's gauge modes that count only live processes (multiprocess mode).
LIVE_GAUGE_MODES = ("liveall", "livemin", "livemax", "livesum", "livemostrecent")


class _ProcessFiles(MultiProcessCollector):
    """Every process's files, but the live gauges only of processes still alive.

    prometheus-client drops a process's live gauges only when told the process died
    (`mark_process_dead`), which a SIGKILLed or lost process never does: its last value
    would be summed in for ever. The processes that write live gauges are the watchers
    (the push connections), and Redis knows which are alive (their heartbeats, named
    `host-pid` like the files); a dead one's file is left out. When Redis cannot say,
    every file counts. The files are left on disk: a watcher whose heartbeat was only
    late keeps writing to its own, and shows again."""

    def collect(self) -> Any:
        files = glob.glob(os.path.join(self._path, "*.db"))
        try:
            alive = push_leases.live_processes()
        except (redis.RedisError, OSError):
            return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return self.merge([f for f in files if _kept(f, alive)], accumulate=True)  # type: ignore[no-untyped-call]


def _kept(path: str, alive: set[str]) -> bool:
    name = os.path.basename(path).removesuffix(".db")
    for mode in LIVE_GAUGE_MODES:
        prefix = f"gauge_{mode}_"
        if name.startswith(prefix):
            return name.removeprefix(prefix) in alive
    return True


class _Collected(Collector):
    """The multiprocess files' metrics (dead watchers' live gauges left out), then the
    state's; IMAP host names summed away unless METRICS_HOST_LABEL asks for them."""

    def __init__(self, state: list[Metric]) -> None:
        self._files = _ProcessFiles(None, path=str(multiproc_dir()))  # type: ignore[no-untyped-call]
        self._state = state

    def collect(self) -> Iterator[Metric]:
        host_label = get_settings().metrics_host_label
        for family in self._files.collect():
            yield family if host_label else _without_label(family, "host")
        yield from self._state


def _without_label(family: Metric, label: str) -> Metric:
    if not any(label in sample.labels for sample in family.samples):
        return family
    totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in family.samples:
        labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != label))
        totals[(sample.name, labels)] = totals.get((sample.name, labels), 0.0) + sample.value
    merged = Metric(family.name, family.documentation, family.type)
    for (name, labels), value in totals.items():
        merged.add_sample(name, dict(labels), value)
    return merged


def generate_latest(state: list[Metric]) -> bytes:
    _poll_metrics()  # so a scrape before any poll already lists the poll metrics at 0
    _audit_metrics()
    registry = CollectorRegistry()
    registry.register(_Collected(state))
    return _generate_latest(registry)


router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(request: Request) -> Response:
    """Prometheus text: polls by outcome, messages and bytes ingested, poll durations,
    mailboxes by status, stale mailboxes, ingestion lag, queue lengths, schedule entries
    and capacity (polls demanded and completed per second, the oldest queued poll's
    wait), what audits found missing and repaired."""
    cache: StateCache = request.app.state.metrics
    return Response(generate_latest(cache.families()), media_type=CONTENT_TYPE_LATEST)
