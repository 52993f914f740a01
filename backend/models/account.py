from __future__ import annotations

from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.sql.expression import false, true

from backend.models.base import NO_ID_REUSE, Base, EnumString, TimestampMixin, UTCDateTime, utcnow
from backend.models.enums import (
    AccountStatus,
    AuthMethod,
    ErrorKind,
    ImapSecurity,
    InitialSync,
    PushStatus,
)

if TYPE_CHECKING:
    from backend.models.message import Message
    from backend.models.poll_run import PollRun


class Account(TimestampMixin, Base):
    """A mailbox to poll. Secrets live only in `credentials_encrypted` (Fernet JSON)."""

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("imap_host", "imap_port", "username"),
        # The lists page in id order (backend/paging.py): by status, and the scheduled
        # accounts (/admin/schedules, capacity), whose filter and intervals the index holds
        # so neither reads the table.
        Index("ix_accounts_status_id", "status", "id"),
        Index("ix_accounts_id_schedule", "id", "enabled", "status", "poll_interval_seconds"),
        NO_ID_REUSE,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320))
    imap_host: Mapped[str] = mapped_column(String(255))
    imap_port: Mapped[int] = mapped_column(Integer)
    imap_security: Mapped[ImapSecurity] = mapped_column(
        EnumString(ImapSecurity, 16), default=ImapSecurity.SSL
    )
    username: Mapped[str] = mapped_column(String(320))
    # The preset it was made from (backend/mailbox/providers.py), or None: shown, and
    # offered again by the console's form. The limits go by imap_host either way.
    provider: Mapped[str | None] = mapped_column(String(32), nullable=True)
    auth_method: Mapped[AuthMethod] = mapped_column(
        EnumString(AuthMethod, 16), default=AuthMethod.PASSWORD
    )
    # {"password": ...} or {"access_token", "refresh_token", "expires_at", "client_id",
    # "client_secret", "token_url"}; see backend/crypto.py.
    credentials_encrypted: Mapped[str] = mapped_column(Text)
    folders: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["INBOX"])
    poll_interval_seconds: Mapped[int] = mapped_column(Integer, default=300)
    # 0-9, higher is more urgent: the order in which queued polls are taken (see
    # docs/architecture.md, "Priorities").
    priority: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Push: a watcher holds IDLE on its folders and polls it at once on news; the schedule
    # still polls on the interval (the safety net). push_status says what the watcher
    # found (unsupported: no IDLE on the server, polling only).
    push: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    push_status: Mapped[PushStatus | None] = mapped_column(EnumString(PushStatus, 16))
    # When a live watcher last confirmed push_status (every WATCHER_LEASE_SECONDS): a
    # status nobody confirms any more is shown as stale (backend/accounts/schemas.py).
    push_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When the login (server, username, password or OAuth token) was last changed through
    # the API: a watcher holding IDLE on the old one connects again (backend/push/).
    login_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Change tracking (backend/mailbox/changes.py): flags, deletions and moves on the
    # server reach the stored messages and the receivers.
    track_changes: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # Where change tracking stands in each folder (backend/mailbox/changes.py): on the
    # account row, which every poll reads anyway, so an idle poll costs no statement more.
    change_state: Mapped[dict[str, dict[str, Any]] | None] = mapped_column(JSON)

    initial_sync: Mapped[InitialSync] = mapped_column(
        EnumString(InitialSync, 16), default=InitialSync.ALL
    )
    initial_sync_count: Mapped[int | None] = mapped_column(Integer)
    initial_sync_since: Mapped[date | None] = mapped_column(Date)

    # The URL with any userinfo (basic auth) as `***@`; the userinfo is encrypted apart
    # (netpolicy.split_userinfo), like every other secret.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_userinfo_encrypted: Mapped[str | None] = mapped_column(Text)
    webhook_secret_encrypted: Mapped[str | None] = mapped_column(Text)

    status: Mapped[AccountStatus] = mapped_column(
        EnumString(AccountStatus, 16), default=AccountStatus.ACTIVE
    )
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_kind: Mapped[ErrorKind | None] = mapped_column(EnumString(ErrorKind, 16))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    # Set from consecutive failures; a poll before this moment is skipped.
    backoff_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    # Kept in the poll transaction so listing accounts needs no COUNT over messages.
    message_count: Mapped[int] = mapped_column(BigInteger, default=0)
    # The fencing token of the poll that last took the mailbox: a batch commits only
    # while it is the committing poll's own (backend/mailbox/lock.py).
    poll_fence: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # How far the latest sync of each folder has come: {"INBOX": {"done": 120, "total":
    # 5000}}, written with each batch the poll commits (a first sync shows it filling).
    sync_progress: Mapped[dict[str, dict[str, int]] | None] = mapped_column(JSON)
    # Freshness and audits (backend/audit/): since when the account has had no complete
    # poll within its freshness limit (None: fresh), set and cleared by the freshness
    # check with the account.stale / account.fresh event; when its last audit was sent.
    stale_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    audited_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The folders whose last try failed while others were polled (gone, refused): by
    # name, the error, failures in a row, since when and when it is tried again.
    folder_errors: Mapped[dict[str, dict[str, Any]] | None] = mapped_column(JSON)

    cursors: Mapped[list[FolderCursor]] = relationship(
        back_populates="account", cascade="all, delete-orphan", passive_deletes=True
    )
    messages: Mapped[list[Message]] = relationship(
        back_populates="account", cascade="all, delete-orphan", passive_deletes=True
    )
    poll_runs: Mapped[list[PollRun]] = relationship(
        back_populates="account", cascade="all, delete-orphan", passive_deletes=True
    )


class FolderCursor(Base):
    """How far a folder has been ingested: the last UID stored under one UIDVALIDITY,
    and the UIDNEXT the server stated before the last complete poll of the folder (an
    unchanged UIDNEXT means nothing was appended since: the poll skips the folder)."""

    __tablename__ = "folder_cursors"
    __table_args__ = (UniqueConstraint("account_id", "folder"), NO_ID_REUSE)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(1024))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    uidnext: Mapped[int | None] = mapped_column(BigInteger)
    # Set as a UIDVALIDITY is first seen: its UIDNEXT then. The UIDs below it are the
    # messages the folder held at the change, matched by content with those held from
    # earlier generations; those above arrived later and are new mail. None: match all.
    match_below: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    account: Mapped[Account] = relationship(back_populates="cursors")


class AccountCleanup(Base):
    """An account deleted whose stored objects may not all be gone yet: its removal and
    this record are committed together, and the storage sweep deletes the objects under
    `accounts/{id}/` until a pass after the last poll that could still write there (one
    running at deletion time) found nothing left. So a crash after the commit, storage
    down, or a poll finishing late leaves no objects behind for good."""

    __tablename__ = "account_cleanups"
    __table_args__ = NO_ID_REUSE

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(Integer, unique=True)  # the account is gone
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
