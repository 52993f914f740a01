"""What the messages API returns: metadata only; the bytes come from the raw and
attachment download routes."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from backend.paging import NextAfter


class AttachmentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    filename: str | None
    safe_name: str
    content_type: str
    content_id: str | None
    size: int
    content_hash: str


class MessageSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    account_id: int
    folder: str
    uidvalidity: int
    uid: int
    message_id: str | None
    subject: str | None
    from_addr: str | None
    to_addrs: list[str]
    cc_addrs: list[str]
    date: datetime | None
    internal_date: datetime | None
    flags: list[str]
    size: int
    content_hash: str | None
    storage_backend: str | None  # None: the body was not stored (see skipped_reason)
    parse_error: str | None
    skipped_reason: str | None
    ingested_at: datetime
    processed_at: datetime | None
    # When a poll found it expunged on the server (change tracking); the row and its
    # objects are kept.
    deleted_at: datetime | None = None


class MessageRead(MessageSummary):
    attachments: list[AttachmentRead]


class MessageList(BaseModel):
    items: list[MessageSummary]
    total: int
    next_after: NextAfter = None
