"""All tables. Import from here so Alembic and the app see the same metadata."""

from backend.models.account import Account, AccountCleanup, FolderCursor
from backend.models.backfill import Backfill
from backend.models.base import Base, utcnow
from backend.models.enums import (
    ACCOUNT_EVENTS,
    FAILED_POLL_OUTCOMES,
    AccountStatus,
    AuthMethod,
    BackfillStatus,
    DeliveryStatus,
    DeliveryTarget,
    ErrorKind,
    EventType,
    HealthStatus,
    ImapSecurity,
    InitialSync,
    PollOutcome,
    PushStatus,
    SchedulerMode,
    StorageBackend,
)
from backend.models.message import Attachment, Message
from backend.models.poll_run import PollRun
from backend.models.webhook import WebhookDelivery

__all__ = [
    "ACCOUNT_EVENTS",
    "FAILED_POLL_OUTCOMES",
    "Account",
    "AccountCleanup",
    "AccountStatus",
    "Attachment",
    "AuthMethod",
    "Backfill",
    "BackfillStatus",
    "Base",
    "DeliveryStatus",
    "DeliveryTarget",
    "ErrorKind",
    "EventType",
    "FolderCursor",
    "HealthStatus",
    "ImapSecurity",
    "InitialSync",
    "Message",
    "PollOutcome",
    "PollRun",
    "PushStatus",
    "SchedulerMode",
    "StorageBackend",
    "WebhookDelivery",
    "utcnow",
]
