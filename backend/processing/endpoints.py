from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from backend.deps import AdminDep, SessionDep
from backend.errors import NotFound, error_responses
from backend.models import Backfill
from backend.processing import backfill as backfill_service
from backend.processing import reparse as reparse_service
from backend.processing.schemas import (
    BackfillRead,
    BackfillRequest,
    ReparseRead,
    ReparseRequest,
)

router = APIRouter(dependencies=[AdminDep], tags=["processing"])

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]


@router.post(
    "/accounts/{account_id}/backfill",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 422),
)
def backfill(
    account_id: AccountId,
    request: BackfillRequest,
    session: SessionDep,
) -> BackfillRead:
    """Fetch again what the server still holds in a range (after an outage): missing
    messages are stored and handed on, held ones are not stored twice (and are sent to
    the webhooks again with `redeliver`). Runs as a task: the answer (202) is the
    backfill, queued; `GET /backfills/{id}` shows it fill up folder by folder, and its
    outcome. Try `dry_run` first."""
    row = backfill_service.create(session, account_id, request.model_dump(mode="json"))
    session.commit()
    backfill_service.enqueue(row.id)
    session.refresh(row)
    return BackfillRead.model_validate(row)


@router.get("/backfills/{backfill_id}", responses=error_responses(404))
def get_backfill(backfill_id: Id, session: SessionDep) -> BackfillRead:
    """A backfill: queued, running (the folders done so far in `result`), done or failed."""
    row = session.get(Backfill, backfill_id)
    if row is None:
        raise NotFound(f"backfill {backfill_id} not found")
    return BackfillRead.model_validate(row)


def _reparse(
    account_id: int | None, request: ReparseRequest | None, session: SessionDep
) -> ReparseRead:
    notify = request.notify if request is not None else False
    messages = reparse_service.count(session, account_id)
    reparse_service.enqueue(account_id, notify=notify)
    return ReparseRead(account_id=account_id, messages=messages, notify=notify)


@router.post(
    "/accounts/{account_id}/reparse",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 422),
)
def reparse_account(
    account_id: AccountId, session: SessionDep, request: ReparseRequest | None = None
) -> ReparseRead:
    """Re-parse the account's stored messages from their raw bytes (after a parser
    upgrade): only the parsed fields change (subject, addresses, date, bodies, attachment
    names and types). Runs as a task (202), in pages, in id order; a message whose raw
    bytes cannot be read is logged and left as it was. Sends nothing unless `notify`."""
    return _reparse(account_id, request, session)


@router.post("/admin/reparse", status_code=status.HTTP_202_ACCEPTED, responses=error_responses(422))
def reparse_all(session: SessionDep, request: ReparseRequest | None = None) -> ReparseRead:
    """`POST /accounts/{id}/reparse` for every account's stored messages."""
    return _reparse(None, request, session)
