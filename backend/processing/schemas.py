from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backend.accounts.schemas import Folder
from backend.models import BackfillStatus

Uid = Annotated[int, Field(ge=1, le=2**32 - 1)]


class BackfillRequest(BaseModel):
    """A UID range, a date range (the server's INTERNALDATE), both, or neither (all the
    server holds). Dates are days: `since` inclusive, `before` exclusive."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"since": "2026-11-20", "before": "2026-11-22", "dry_run": True}]
        },
    )

    folders: list[Folder] | None = Field(
        default=None, min_length=1, description="default: all the account's folders"
    )
    uid_from: Uid | None = None
    uid_to: Uid | None = None
    since: date | None = None
    before: date | None = None
    dry_run: bool = Field(default=False, description="count only; fetch and send nothing")
    redeliver: bool = Field(
        default=False,
        description="send messages already held and delivered to the webhooks again "
        "(new event ids)",
    )

    @model_validator(mode="after")
    def _ranges_in_order(self) -> BackfillRequest:
        if self.uid_from is not None and self.uid_to is not None and self.uid_from > self.uid_to:
            raise ValueError("uid_from must not be above uid_to")
        if self.since is not None and self.before is not None and self.since >= self.before:
            raise ValueError("since must be before 'before'")
        return self


class FolderBackfillOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    folder: str
    uidvalidity: int
    on_server: int = Field(description="messages in the range on the server")
    held: int = Field(description="of those, already stored")
    missing: int = Field(description="of those, not stored (fetched unless a dry run)")
    stored: int = Field(description="new messages stored now")
    handed_on: int = Field(description="held but never processed: processed now")
    redelivered: int = Field(description="held and processed: sent to the webhooks again")


class BackfillResponse(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    dry_run: bool
    folders: list[FolderBackfillOut]
    stored_message_ids: list[int]
    redelivered_message_ids: list[int]


class BackfillRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    account_id: int
    status: BackfillStatus
    request: BackfillRequest
    result: BackfillResponse | None = Field(
        description="while running: the folders done so far; then the whole outcome"
    )
    error: str | None = Field(description="why it failed")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ReparseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"notify": False}]})

    # Strict: `"notify": 0` or `"yes"` is a 422, not a guess.
    notify: bool = Field(
        default=False,
        strict=True,
        description="send a message.reparsed event for each processed message whose "
        "parsed fields changed (nothing is sent without it)",
    )


class ReparseRead(BaseModel):
    account_id: int | None = Field(description="null: every account")
    messages: int = Field(description="stored messages to re-parse")
    notify: bool


class QuarantineReplayed(BaseModel):
    """Messages taken out of quarantine and handed on again, their failure count at zero.
    A receiver that had one already is not sent it twice."""

    replayed: int
    message_ids: list[int]
