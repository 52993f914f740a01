"""/accounts/{id}/audit: audit a mailbox on demand (a task) and read its latest result."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from backend.audit import service
from backend.audit.schemas import AccountAuditRead, AuditQueued, FolderAuditRead
from backend.deps import AdminDep, KnownQueryDep, SessionDep
from backend.errors import error_responses

router = APIRouter(
    prefix="/accounts",
    tags=["audit"],
    dependencies=[AdminDep, KnownQueryDep],
    responses=error_responses(401),
)

AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post(
    "/{account_id}/audit",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 422),
)
def audit(
    account_id: AccountId,
    session: SessionDep,
    deep: Annotated[
        bool,
        Query(description="also read every stored object and compare its SHA-256 with the row's"),
    ] = False,
) -> AuditQueued:
    """Audit the mailbox now, as a task: each polled folder's UIDs on the server against
    the stored and skipped ones, and each stored object against the store; missing
    messages and objects are fetched again and stored, exactly once. The answer (202) is
    at once; `GET /accounts/{id}/audit` shows the result per folder."""
    service.get_account(session, account_id)
    session.commit()
    service.enqueue(account_id, deep=deep)
    return AuditQueued(account_id=account_id, deep=deep)


@router.get("/{account_id}/audit", responses=error_responses(404))
def latest_audit(account_id: AccountId, session: SessionDep) -> AccountAuditRead:
    """The latest audit of each folder: server count, expected, stored, skipped, missing,
    repaired, objects checked, missing and repaired, and when."""
    folders = service.latest(session, account_id)
    account = service.get_account(session, account_id)
    return AccountAuditRead(
        account_id=account_id,
        audited_at=account.audited_at,
        stale_since=account.stale_since,
        folders=[FolderAuditRead.model_validate(row) for row in folders],
    )
