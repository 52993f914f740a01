"""Dead letters: list them, replay one, all of an account's, or all."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy.orm import Session

from backend.deps import AdminDep, After, KnownQueryDep, SessionDep
from backend.webhooks import service
from backend.webhooks.schemas import DeadLetter, DeadLetterPage, Replayed

router = APIRouter(dependencies=[AdminDep, KnownQueryDep], tags=["webhooks"])

# Ids beyond the columns' range would be a database error, not a 404.
AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
DeliveryId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/admin/dead-letters", response_model=DeadLetterPage)
def list_dead_letters(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    after: After = None,
    account_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> DeadLetterPage:
    """Deliveries that exhausted their retries or were refused, newest first."""
    page = service.list_dead_letters(
        session, limit=limit, offset=offset, after=after, account_id=account_id
    )
    return DeadLetterPage(
        items=[DeadLetter.model_validate(item) for item in page.items],
        total=page.total,
        next_after=page.next_after,
    )


@router.post("/admin/dead-letters/{delivery_id}/replay", response_model=Replayed, status_code=202)
def replay_dead_letter(delivery_id: DeliveryId, session: SessionDep) -> Replayed:
    """Queue one dead letter again: a full set of attempts, the same event id."""
    return _send(session, service.replay_dead_letters(session, delivery_id=delivery_id))


@router.post("/accounts/{account_id}/dead-letters/replay", response_model=Replayed, status_code=202)
def replay_account_dead_letters(account_id: AccountId, session: SessionDep) -> Replayed:
    """Every dead letter of the account, queued again."""
    return _send(session, service.replay_dead_letters(session, account_id=account_id))


@router.post("/admin/dead-letters/replay", response_model=Replayed, status_code=202)
def replay_all_dead_letters(session: SessionDep) -> Replayed:
    """Every dead letter, queued again (after a receiver's long outage)."""
    return _send(session, service.replay_dead_letters(session))


def _send(session: Session, delivery_ids: list[int]) -> Replayed:
    # Sent only once the requeue is committed, or a fast worker would find them dead.
    session.commit()
    service.dispatch(delivery_ids)
    return Replayed(replayed=len(delivery_ids), delivery_ids=delivery_ids)
