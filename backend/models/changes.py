from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import NO_ID_REUSE, Base, UTCDateTime


class FolderChanges(Base):
    """Where change tracking (backend/mailbox/changes.py) stands in a folder, under one
    UIDVALIDITY: the HIGHESTMODSEQ every change up to which is recorded (CONDSTORE), and
    what STATUS said then, so a poll can tell an expunge from the counts."""

    __tablename__ = "folder_changes"
    __table_args__ = (UniqueConstraint("account_id", "folder"), NO_ID_REUSE)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(1024))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    highestmodseq: Mapped[int | None] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger)
    messages: Mapped[int] = mapped_column(BigInteger)
    # The last time every message's flags and the whole UID set were compared (servers
    # without CONDSTORE / QRESYNC; CHANGES_FULL_CHECK_SECONDS).
    full_check_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
