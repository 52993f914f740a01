from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from backend.deps import AdminDep
from backend.processing import backfill as backfill_service
from backend.processing.schemas import BackfillRequest, BackfillResponse

router = APIRouter(dependencies=[AdminDep], tags=["processing"])


@router.post("/accounts/{account_id}/backfill", response_model=BackfillResponse)
def backfill(
    account_id: Annotated[int, Path(ge=1, le=2**31 - 1)], request: BackfillRequest
) -> BackfillResponse:
    """Fetch again what the server still holds in a range (after an outage): missing
    messages are stored and handed on, held ones are not stored twice (and are sent to
    the webhooks again with `redeliver`). Runs in the request; try `dry_run` first."""
    result = backfill_service.backfill(
        account_id,
        window=backfill_service.Range(
            uid_from=request.uid_from,
            uid_to=request.uid_to,
            since=request.since,
            before=request.before,
        ),
        folders=request.folders,
        dry_run=request.dry_run,
        redeliver=request.redeliver,
    )
    return BackfillResponse.model_validate(result)
