from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.models.base import NO_ID_REUSE, Base, EnumString, UTCDateTime, utcnow
from backend.models.enums import StorageBackend

if TYPE_CHECKING:
    from backend.models.account import Account


_LIVE_WITH_ID = "email_id IS NOT NULL AND deleted_at IS NULL"


class Message(Base):
    """One message as the server held it: (account, folder, UIDVALIDITY, UID) is its identity."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("account_id", "folder", "uidvalidity", "uid"),
        # Re-scan after a UIDVALIDITY change looks messages up by content hash.
        Index("ix_messages_account_folder_hash", "account_id", "folder", "content_hash"),
        Index("ix_messages_account_id_id", "account_id", "id"),
        # One live message per server identity: the same Gmail message (X-GM-MSGID) or
        # EMAILID met in a second polled folder is not stored again, even by a backfill
        # or an audit racing the poll (their inserts skip it: ON CONFLICT DO NOTHING).
        Index(
            "ux_messages_account_email_id",
            "account_id",
            "email_id",
            unique=True,
            postgresql_where=text(_LIVE_WITH_ID),
            sqlite_where=text(_LIVE_WITH_ID),
        ),
        # The processing sweep looks for messages whose task was lost; only those are indexed.
        Index(
            "ix_messages_unprocessed",
            "id",
            postgresql_where=text("processed_at IS NULL"),
            sqlite_where=text("processed_at IS NULL"),
        ),
        # Quarantined messages are few: listed and counted from their own index.
        Index(
            "ix_messages_quarantined",
            "account_id",
            "id",
            postgresql_where=text("quarantined_at IS NOT NULL"),
            sqlite_where=text("quarantined_at IS NOT NULL"),
        ),
        NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(1024))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uid: Mapped[int] = mapped_column(BigInteger)

    message_id: Mapped[str | None] = mapped_column(String(998), index=True)
    subject: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(Text)
    to_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(JSON, default=list)
    date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    internal_date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    content_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 hex of the raw bytes
    # Decoded bodies (the first inline text/plain and text/html parts), for processing.
    text_body: Mapped[str | None] = mapped_column(Text)
    html_body: Mapped[str | None] = mapped_column(Text)

    # None: the body was not stored (see skipped_reason).
    storage_backend: Mapped[StorageBackend | None] = mapped_column(EnumString(StorageBackend, 16))
    storage_key: Mapped[str | None] = mapped_column(String(1024))
    parse_error: Mapped[str | None] = mapped_column(Text)
    # The parsed fields whose text is a best guess (ParsedMessage.decode_fallbacks).
    decode_fallbacks: Mapped[list[str] | None] = mapped_column(JSON)
    skipped_reason: Mapped[str | None] = mapped_column(Text)  # e.g. larger than the maximum

    # The server's identity of the message across folders (OBJECTID EMAILID, Gmail's
    # X-GM-MSGID), when it has one: a message moved between folders is recognised by it.
    email_id: Mapped[str | None] = mapped_column(String(255))
    # The server's thread of the message (OBJECTID THREADID, X-GM-THRID), and its Gmail
    # labels (X-GM-LABELS: system ones as `\Inbox`, the others decoded from modified
    # UTF-7); None where the server has none.
    thread_id: Mapped[str | None] = mapped_column(String(255))
    labels: Mapped[list[str] | None] = mapped_column(JSON)

    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # When a poll found it expunged on the server; the row and its objects are kept.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Times its processing failed while others went through, the last reason and when it
    # last failed; at MAX_PROCESS_FAILURES (backend/processing/service.py) it is
    # quarantined: set aside (not retried, left by the sweep) until it is replayed
    # (backend/processing/quarantine.py) or processed.
    process_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    process_error: Mapped[str | None] = mapped_column(Text)
    process_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    quarantined_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    account: Mapped[Account] = relationship(back_populates="messages")
    attachments: Mapped[list[Attachment]] = relationship(
        back_populates="message",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Attachment.id",
    )


class Attachment(Base):
    __tablename__ = "attachments"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    filename: Mapped[str | None] = mapped_column(Text)  # as the sender gave it
    safe_name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(255))
    content_id: Mapped[str | None] = mapped_column(String(998))
    size: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String(64))
    storage_backend: Mapped[StorageBackend] = mapped_column(EnumString(StorageBackend, 16))
    storage_key: Mapped[str] = mapped_column(String(1024))

    message: Mapped[Message] = relationship(back_populates="attachments")
