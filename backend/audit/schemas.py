from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from backend.models import AuditOutcome


class AuditQueued(BaseModel):
    account_id: int
    deep: bool
    detail: str = "queued: GET /accounts/{id}/audit shows each folder's result as it is done"


class FolderAuditRead(BaseModel):
    """The latest audit of one folder. Every server UID at or below `cursor` (the last
    UID polled) is stored, skipped (kept without its body, with the reason) or missing."""

    model_config = ConfigDict(from_attributes=True)

    folder: str
    outcome: AuditOutcome
    deep: bool
    uidvalidity: int | None
    cursor: int | None
    server: int = Field(description="messages on the server (all UIDs)")
    expected: int = Field(
        description="of those, at or below the cursor and not left out by the initial-sync policy"
    )
    stored: int = Field(description="rows with their raw message")
    skipped: int = Field(description="rows kept without it (too large, refused)")
    missing: int = Field(description="expected but not stored")
    repaired: int = Field(description="of the missing, stored now")
    objects_checked: int
    objects_missing: int = Field(description="objects not in the store (or altered: deep)")
    objects_repaired: int = Field(description="written again, byte for byte")
    error: str | None = Field(description="why the folder was skipped or failed")
    started_at: datetime
    finished_at: datetime


class AccountAuditRead(BaseModel):
    account_id: int
    audited_at: datetime | None = Field(description="when its last audit was sent or finished")
    stale_since: datetime | None = Field(
        description="since when it has had no complete poll within its freshness limit"
    )
    folders: list[FolderAuditRead]
