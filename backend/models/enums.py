"""Every status, outcome and kind that mailbeat stores or returns, defined once.

StrEnums, so a member is its string: the database keeps the plain value (VARCHAR, no
ALTER TYPE to add one), the API returns it, and comparisons with stored strings hold.
The values are the contract: renaming a member is free, changing a value is a migration
and an API change.
"""

from __future__ import annotations

from enum import StrEnum


class AccountStatus(StrEnum):
    """active: polled; error: the last poll failed (retried with backoff); disabled: not
    polled until someone enables it again (by hand, or too many failures)."""

    ACTIVE = "active"
    ERROR = "error"
    DISABLED = "disabled"


class ImapSecurity(StrEnum):
    SSL = "ssl"
    STARTTLS = "starttls"
    NONE = "none"


class AuthMethod(StrEnum):
    PASSWORD = "password"  # noqa: S105 - the method's name, not a secret
    OAUTH2 = "oauth2"


class InitialSync(StrEnum):
    """What the first poll of a folder ingests: everything, the newest N, or since a day."""

    ALL = "all"
    NEWEST = "newest"
    SINCE = "since"


class ErrorKind(StrEnum):
    """How a failed poll is treated: auth waits for new credentials or the backoff,
    connection retries with backoff, protocol means the server said no or spoke nonsense,
    internal is mailbeat's own bug, throttled is the provider shedding load (retried after
    its suggested wait or a short backoff, never counted as a failure)."""

    AUTH = "auth"
    CONNECTION = "connection"
    PROTOCOL = "protocol"
    INTERNAL = "internal"
    THROTTLED = "throttled"


class PollOutcome(StrEnum):
    """running: not finished (or the worker died); success: polled; skipped: another poll
    held the lock or backoff applies; no_slot: the host's connection budget was full for
    the whole wait; *_error: failed, see PollRun.error."""

    RUNNING = "running"
    SUCCESS = "success"
    SKIPPED = "skipped"
    AUTH_ERROR = "auth_error"
    CONNECTION_ERROR = "connection_error"
    PROTOCOL_ERROR = "protocol_error"
    INTERNAL_ERROR = "internal_error"
    THROTTLED_ERROR = "throttled_error"
    # No connection slot came free in time (backend/mailbox/budget.py): sent again soon,
    # not a failure.
    NO_SLOT = "no_slot"

    @classmethod
    def for_error(cls, kind: ErrorKind) -> PollOutcome:
        return cls(f"{kind.value}_error")


# The outcomes of a poll that failed, one per ErrorKind.
FAILED_POLL_OUTCOMES = tuple(PollOutcome.for_error(kind) for kind in ErrorKind)


class EventType(StrEnum):
    """Webhook event types. The account events report a change of AccountStatus, of its
    freshness (stale: no complete poll within its freshness limit; fresh: polled again),
    or an audit that found messages or objects missing (backend/audit/)."""

    MESSAGE_RECEIVED = "message.received"
    # A message re-parsed from its raw bytes (a parser upgrade), sent only when asked.
    MESSAGE_REPARSED = "message.reparsed"
    # Changes on the server to a message received before (backend/mailbox/changes.py).
    MESSAGE_UPDATED = "message.updated"
    MESSAGE_DELETED = "message.deleted"
    MESSAGE_MOVED = "message.moved"
    ACCOUNT_ERROR = "account.error"
    ACCOUNT_DISABLED = "account.disabled"
    ACCOUNT_RECOVERED = "account.recovered"
    ACCOUNT_STALE = "account.stale"
    ACCOUNT_FRESH = "account.fresh"
    ACCOUNT_AUDIT = "account.audit"


ACCOUNT_EVENTS = frozenset(
    {
        EventType.ACCOUNT_ERROR,
        EventType.ACCOUNT_DISABLED,
        EventType.ACCOUNT_RECOVERED,
        EventType.ACCOUNT_STALE,
        EventType.ACCOUNT_FRESH,
        EventType.ACCOUNT_AUDIT,
    }
)


class DeliveryTarget(StrEnum):
    """global: WEBHOOK_URL / WEBHOOK_SECRET; account: the account's own url and secret."""

    GLOBAL = "global"
    ACCOUNT = "account"


class DeliveryStatus(StrEnum):
    """pending: waiting for its next attempt; delivered: the receiver answered 2xx;
    dead: retries exhausted or refused (4xx), kept with its last error until replayed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"


class BackfillStatus(StrEnum):
    """queued: accepted, waiting for a worker (or, with an error "waiting for a connection
    slot: ...", for the host's connection budget: sent again soon); running; done (the
    result is complete); failed (the error says why; the folders done before it are in
    the result)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class AuditOutcome(StrEnum):
    """A folder's audit: complete (every UID at or below the cursor accounted for, every
    object checked), or skipped (not polled yet, or renumbered since: the poll comes
    first), or failed (the error says why)."""

    COMPLETE = "complete"
    SKIPPED = "skipped"
    FAILED = "failed"


class StorageBackend(StrEnum):
    """Recorded on each stored row, so a read finds the object where it was put."""

    S3 = "s3"
    LOCAL = "local"


class SchedulerMode(StrEnum):
    """celery: RedBeat entries, beat and workers over Redis; local: in-process scheduler."""

    CELERY = "celery"
    LOCAL = "local"


class PushStatus(StrEnum):
    """An account with push on, as its watcher last found it. watching: an IDLE
    connection held on every folder; unsupported: the server has no IDLE, so the account
    is polled on its interval only (the fallback); failing: a watcher could not connect
    or select a folder (server down, folder gone, login refused) and is trying again.
    Unset until a watcher has tried, and again after a change of login.
    stale: only shown, never stored: "watching" that no live watcher has confirmed for
    PUSH_STALE_LEASES watcher leases (no watcher runs, or none holds the mailbox)."""

    WATCHING = "watching"
    UNSUPPORTED = "unsupported"
    FAILING = "failing"
    STALE = "stale"


class HealthStatus(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
