"""What the messages API returns: metadata only; the bytes come from the raw and
attachment download routes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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
    # None on rows stored before the column (and when nothing was a guess): [].
    decode_fallbacks: Annotated[list[str], BeforeValidator(lambda value: value or [])] = Field(
        description="the parsed fields whose text is a best guess (raw 8-bit header bytes "
        "read in a fallback charset, a detected body charset, bytes that could not be read); "
        "usually empty"
    )
    skipped_reason: str | None
    # The server's identity of the message across folders (OBJECTID EMAILID, Gmail's
    # X-GM-MSGID), its thread (THREADID, X-GM-THRID) and Gmail's labels (X-GM-LABELS),
    # where the server has them.
    email_id: str | None = None
    thread_id: str | None = None
    labels: list[str] | None = None
    ingested_at: datetime
    processed_at: datetime | None
    # Times its processing failed while others went through, the last reason, and when
    # it last failed (docs/operations.md).
    process_failures: int
    process_error: str | None
    process_failed_at: datetime | None = None
    # When it was set aside after MAX_PROCESS_FAILURES: not retried until it is replayed
    # (`POST /messages/{id}/replay`).
    quarantined_at: datetime | None = None
    # When a poll found it expunged on the server (change tracking); the row and its
    # objects are kept.
    deleted_at: datetime | None = None


class MessageRead(MessageSummary):
    attachments: list[AttachmentRead]


class MessageList(BaseModel):
    items: list[MessageSummary]
    total: int
    next_after: NextAfter = None
