from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import NO_ID_REUSE, Base, EnumString, UTCDateTime, utcnow
from backend.models.enums import DeliveryStatus, DeliveryTarget, EventType


class WebhookDelivery(Base):
    """One event for one target. The event id stays the same across retries and replays,
    so a receiver can drop what it has already seen."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # A message processed twice creates its deliveries once.
        UniqueConstraint("dedupe_key", "target"),
        # Dead letters, newest first, all or one account's, a page at a time.
        Index("ix_webhook_deliveries_status_account_id_id", "status", "account_id", "id"),
        Index("ix_webhook_deliveries_status_id", "status", "id"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    event_type: Mapped[EventType] = mapped_column(EnumString(EventType, 32))
    dedupe_key: Mapped[str] = mapped_column(String(255))
    target: Mapped[DeliveryTarget] = mapped_column(EnumString(DeliveryTarget, 16))
    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    message_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("messages.id", ondelete="CASCADE"),
        index=True,
    )
    # Account events describe a state that changes later, so their data is kept as it
    # was; a message event is built from the stored message when it is sent.
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Where the last attempt went; any userinfo (basic auth) as `***@`.
    url: Mapped[str | None] = mapped_column(String(2048))

    status: Mapped[DeliveryStatus] = mapped_column(
        EnumString(DeliveryStatus, 16), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Set while an attempt is in flight, so a duplicate task does not send it twice;
    # a worker that dies mid-attempt leaves it to expire.
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
