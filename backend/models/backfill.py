from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, Text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import NO_ID_REUSE, Base, EnumString, UTCDateTime, utcnow
from backend.models.enums import BackfillStatus


class Backfill(Base):
    """One backfill asked for through the API: what was asked, how far it has come (the
    folders done so far, in `result`) and how it ended. Run by the `backfill.run` task."""

    __tablename__ = "backfills"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    status: Mapped[BackfillStatus] = mapped_column(
        EnumString(BackfillStatus, 16), default=BackfillStatus.QUEUED
    )
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
