from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import NO_ID_REUSE, Base, EnumString, UTCDateTime, utcnow
from backend.models.enums import AuditOutcome


class FolderAudit(Base):
    """The latest audit of one folder of an account (backend/audit/service.py): the
    server's UIDs at or below the cursor against the stored and skipped rows, and the
    stored rows' objects against the store. One row per folder, replaced by each audit."""

    __tablename__ = "folder_audits"
    __table_args__ = (UniqueConstraint("account_id", "folder"), NO_ID_REUSE)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(1024))
    outcome: Mapped[AuditOutcome] = mapped_column(EnumString(AuditOutcome, 16))
    deep: Mapped[bool] = mapped_column(Boolean, default=False)
    uidvalidity: Mapped[int | None] = mapped_column(BigInteger)
    cursor: Mapped[int | None] = mapped_column(BigInteger)  # the last UID polled
    server: Mapped[int] = mapped_column(Integer, default=0)  # UIDs on the server, all
    expected: Mapped[int] = mapped_column(Integer, default=0)  # of those, at or below the cursor
    stored: Mapped[int] = mapped_column(Integer, default=0)  # rows with their raw message
    skipped: Mapped[int] = mapped_column(Integer, default=0)  # rows kept without it, with why
    missing: Mapped[int] = mapped_column(Integer, default=0)  # expected but without a row
    repaired: Mapped[int] = mapped_column(Integer, default=0)  # of those, stored now
    objects_checked: Mapped[int] = mapped_column(Integer, default=0)
    objects_missing: Mapped[int] = mapped_column(Integer, default=0)  # or not what was stored
    objects_repaired: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
