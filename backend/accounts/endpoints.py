"""/accounts: the mailboxes mailbeat polls. Each change is committed, then the schedule
follows at once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from backend import dispatch
from backend.accounts import service
from backend.accounts.schemas import (
    AccountCheckRead,
    AccountConnection,
    AccountCreate,
    AccountList,
    AccountRead,
    AccountUpdate,
    FolderCheckRead,
    FolderList,
    FolderRead,
    PollQueued,
    ProviderList,
    ProviderRead,
)
from backend.admin.schemas import PollRunList, PollRunRead
from backend.config import get_settings
from backend.deps import AdminDep, After, KnownQueryDep, SessionDep
from backend.errors import error_responses
from backend.mailbox import providers
from backend.mailbox.check import CheckResult, check_account
from backend.models import AccountStatus
from backend.schedules import service as schedules

router = APIRouter(
    prefix="/accounts",
    tags=["accounts"],
    dependencies=[AdminDep, KnownQueryDep],
    responses=error_responses(401),
)

AccountId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=500, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="skip this many items")]


@router.post("", status_code=status.HTTP_201_CREATED, responses=error_responses(400, 409))
def create_account(data: AccountCreate, session: SessionDep) -> AccountRead:
    """Add a mailbox; its schedule entry is created at once (when enabled)."""
    account = service.create_account(session, data)
    session.commit()
    schedules.sync_account(account)
    return AccountRead.model_validate(account)


@router.get("")
def list_accounts(
    session: SessionDep,
    limit: Limit = 50,
    offset: Offset = 0,
    after: After = None,
    status: AccountStatus | None = None,
) -> AccountList:
    """Mailboxes by id, a page at a time: `after` the previous page's `next_after` (or
    `offset`), any page as fast as the first. `total` counts them all (with `status`)."""
    page = service.list_accounts(session, status=status, limit=limit, offset=offset, after=after)
    return AccountList(
        items=[AccountRead.model_validate(a) for a in page.items],
        total=page.total,
        next_after=page.next_after,
    )


@router.get("/providers")
def list_providers() -> ProviderList:
    """The provider presets an account's `provider` may name (backend/mailbox/providers.py):
    what each fills in, what the provider needs of the user, its connection limits."""
    return ProviderList(
        items=[ProviderRead.model_validate(p) for p in providers.PROVIDERS.values()]
    )


@router.get("/{account_id}", responses=error_responses(404))
def get_account(account_id: AccountId, session: SessionDep) -> AccountRead:
    return AccountRead.model_validate(service.get_account(session, account_id))


@router.get("/{account_id}/poll-runs", responses=error_responses(404))
def list_poll_runs(
    account_id: AccountId,
    session: SessionDep,
    limit: Limit = 20,
    offset: Offset = 0,
    after: After = None,
) -> PollRunList:
    """The account's polls, newest first: outcome, messages, bytes and error."""
    page = service.list_poll_runs(session, account_id, limit=limit, offset=offset, after=after)
    return PollRunList(
        items=[PollRunRead.model_validate(run) for run in page.items],
        total=page.total,
        next_after=page.next_after,
    )


@router.get("/{account_id}/folders", responses=error_responses(404))
def list_folders(account_id: AccountId, session: SessionDep) -> FolderList:
    """The account's folders: their cursors (the UIDVALIDITY and last UID stored), how far
    their latest sync has come, and the error of one whose last try failed. Folders found
    through a special use or `*` are listed by their names once polled."""
    account = service.get_account(session, account_id)
    progress = account.sync_progress or {}
    errors = account.folder_errors or {}
    return FolderList(
        items=[
            FolderRead(
                name=name,
                uidvalidity=None if cursor is None else cursor.uidvalidity,
                last_uid=None if cursor is None else cursor.last_uid,
                updated_at=None if cursor is None else cursor.updated_at,
                sync_done=progress.get(name, {}).get("done"),
                sync_total=progress.get(name, {}).get("total"),
                error=errors.get(name, {}).get("error"),
                failures=errors.get(name, {}).get("failures", 0),
                retry_at=errors.get(name, {}).get("retry_at"),
            )
            for name, cursor in service.folder_cursors(session, account)
        ]
    )


@router.patch("/{account_id}", responses=error_responses(400, 404, 409))
def update_account(account_id: AccountId, data: AccountUpdate, session: SessionDep) -> AccountRead:
    """Change a mailbox; the schedule follows at once (an interval change keeps its phase,
    disabling removes the entry, re-enabling restores it with status active). Once it
    holds mail, its mailbox (username, imap_host, imap_port) cannot change: 409, create
    a new account instead."""
    account = service.update_account(session, service.get_account(session, account_id), data)
    session.commit()
    schedules.sync_account(account)
    return AccountRead.model_validate(account)


@router.delete(
    "/{account_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404)
)
def delete_account(account_id: AccountId, session: SessionDep) -> Response:
    """Delete a mailbox with everything it owns: messages, attachments, stored objects,
    cursors, poll history and its schedule entry. Stored objects that cannot be deleted
    now (storage down) go with the next storage sweep."""
    service.delete_account(session, service.get_account(session, account_id))
    session.commit()
    schedules.remove_account(account_id)
    service.delete_objects(account_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{account_id}/poll",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(404, 409, 503),
)
def poll_account(
    account_id: AccountId,
    session: SessionDep,
    force: Annotated[
        bool, Query(description="poll even while the account backs off after failures")
    ] = False,
) -> PollQueued:
    """Poll the mailbox now, outside its schedule, ahead of every scheduled poll. Its
    outcome shows on the account (last_polled_at, last_error) and in the poll run with
    this task id. An account backing off after failed polls answers 409 (saying until
    when) unless `force=true`."""
    task_id = service.queue_poll(session, account_id, force=force)
    return PollQueued(account_id=account_id, task_id=task_id, mode=dispatch.mode())


@router.post("/test", responses=error_responses(400, 422))
def test_connection(data: AccountConnection) -> AccountCheckRead:
    """Try connection settings before saving them: log in and open each folder. Nothing
    is stored. Answers as POST /accounts/{id}/test does."""
    account = service.unsaved_account(data)
    return _check_read(check_account(account, timeout=get_settings().imap_connect_timeout))


@router.post("/{account_id}/test", responses=error_responses(404))
def test_account(account_id: AccountId, session: SessionDep) -> AccountCheckRead:
    """Log in and open every folder now. `stage` says which step failed (dns, connect,
    tls, auth or folder) and `detail` what the server said; gives up within about
    IMAP_CONNECT_TIMEOUT seconds per step."""
    account = service.get_account(session, account_id)
    result = check_account(account, timeout=get_settings().imap_connect_timeout)
    session.commit()  # keeps an XOAUTH2 token the check refreshed
    return _check_read(result)


def _check_read(result: CheckResult) -> AccountCheckRead:
    return AccountCheckRead(
        ok=result.ok,
        stage=None if result.ok else result.stage,
        detail=result.detail,
        folders=[
            FolderCheckRead(name=f.name, ok=f.ok, detail=f.detail, messages=f.messages)
            for f in result.folders
        ],
    )
