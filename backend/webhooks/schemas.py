from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from backend.accounts.schemas import RedactedUrl
from backend.paging import NextAfter


class DeadLetter(BaseModel):
    """A delivery that ran out of attempts (or was refused), kept for replay."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    event_id: str
    event_type: str
    target: str
    account_id: int
    message_id: int | None
    url: RedactedUrl | None
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    created_at: datetime


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]
    total: int
    next_after: NextAfter = None


class Replayed(BaseModel):
    """Deliveries queued again, each with a fresh set of attempts and its original event id."""

    replayed: int
    delivery_ids: list[int]
