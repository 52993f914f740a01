from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from sqlalchemy.orm import Session

from backend.deps import AdminDep, After, KnownQueryDep, SessionDep
from backend.errors import NotFound, error_responses
from backend.messages.schemas import MessageList, MessageSummary
from backend.models import Backfill
from backend.processing import backfill as backfill_service
from backend.processing import quarantine
from backend.processing import reparse as reparse_service
from backend.processing.schemas import (
    BackfillRead,
    BackfillRequest,
    QuarantineReplayed,
    ReparseRead,
    ReparseRequest,
)
from backend.processing.service import hand_on

router = APIRouter(dependencies=[AdminDep], tags=["processing"])

Id = Annotated[int, Path(ge=1, le=2**63 - 1)]
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
MessageId = Annotated[int, Path(ge=1, le=2**63 - 1)]


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


@router.get("/admin/quarantine", dependencies=[KnownQueryDep], responses=error_responses(422))
def list_quarantined(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    after: After = None,
    account_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> MessageList:
    """Quarantined messages of every mailbox (or `account_id`'s), newest first: each failed
    processing MAX_PROCESS_FAILURES times while others went through (`process_failures`,
    the last reason in `process_error`) and waits for a replay while the others flow."""
    page = quarantine.list_quarantined(
        session, limit=limit, offset=offset, after=after, account_id=account_id
    )
    return MessageList(
        items=[MessageSummary.model_validate(m) for m in page.items],
        total=page.total,
        next_after=page.next_after,
    )


@router.post(
    "/messages/{message_id}/replay",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 409),
)
def replay_message(message_id: MessageId, session: SessionDep) -> QuarantineReplayed:
    """Hand a quarantined message on again, after a fix: its failure count starts again
    (it is quarantined anew after MAX_PROCESS_FAILURES more). A receiver that had it is
    not sent it twice. 409 when it is not quarantined."""
    return _replay(session, quarantine.release(session, message_id=message_id))


@router.post(
    "/accounts/{account_id}/quarantine/replay",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404),
)
def replay_account(account_id: AccountId, session: SessionDep) -> QuarantineReplayed:
    """`POST /messages/{id}/replay` for every quarantined message of the account."""
    return _replay(session, quarantine.release(session, account_id=account_id))


@router.post("/admin/quarantine/replay", status_code=status.HTTP_202_ACCEPTED)
def replay_all(session: SessionDep) -> QuarantineReplayed:
    """`POST /messages/{id}/replay` for every quarantined message."""
    return _replay(session, quarantine.release(session))


def _replay(session: Session, message_ids: list[int]) -> QuarantineReplayed:
    # Handed on after the commit, as every task is sent: the attempts see the count at zero.
    session.commit()
    hand_on(message_ids)
    return QuarantineReplayed(replayed=len(message_ids), message_ids=message_ids)
