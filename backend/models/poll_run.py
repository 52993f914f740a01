from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from backend.models.base import NO_ID_REUSE, Base, EnumString, UTCDateTime, utcnow
from backend.models.enums import PollOutcome

if TYPE_CHECKING:
    from backend.models.account import Account


class PollRun(Base):
    __tablename__ = "poll_runs"
    __table_args__ = (
        Index("ix_poll_runs_account_id_started_at", "account_id", "started_at"),
        # An account's runs, newest first, a page at a time (backend/paging.py).
        Index("ix_poll_runs_account_id_id", "account_id", "id"),
        # Polls completed per second (the capacity route, /metrics, /health) count the
        # runs finished in the last minute.
        Index("ix_poll_runs_finished_at", "finished_at"),
        NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    outcome: Mapped[PollOutcome] = mapped_column(
        EnumString(PollOutcome, 32), default=PollOutcome.RUNNING
    )
    messages_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes_count: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(255))

    account: Mapped[Account] = relationship(back_populates="poll_runs")

    @property
    def duration_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()
