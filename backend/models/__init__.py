"""All tables. Import from here so Alembic and the app see the same metadata."""

from backend.models.account import Account, AccountCleanup, FolderCursor
from backend.models.base import Base, utcnow
from backend.models.message import Attachment, Message
from backend.models.poll_run import PollRun
from backend.models.webhook import WebhookDelivery

__all__ = [
    "Account",
    "AccountCleanup",
    "Attachment",
    "Base",
    "FolderCursor",
    "Message",
    "PollRun",
    "WebhookDelivery",
    "utcnow",
]
