"""Testing an account's connection now: server, TLS, credentials and each folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend import crypto
from backend.mailbox import budget, credentials, imap
from backend.mailbox import folders as mailbox_folders
from backend.mailbox.imap import ImapError
from backend.models import Account, ErrorKind

# How long a check waits for a slot in the host's connection budget: a person waits for
# the answer, and a full budget is said at once rather than after a poll's wait.
SLOT_WAIT_SECONDS = 5.0


@dataclass
class FolderCheck:
    name: str
    ok: bool
    detail: str
    messages: int | None = None


@dataclass
class CheckResult:
    ok: bool
    stage: str  # the stage that failed, or "folder" (the last one) when everything worked
    detail: str
    folders: list[FolderCheck] = field(default_factory=list)


def check_account(account: Account, *, timeout: float) -> CheckResult:
    """Try the account's server, credentials and folders now. A refreshed XOAUTH2 token
    is set on `account`; the caller's commit keeps it."""

    def keep(secrets: dict[str, Any]) -> None:
        account.credentials_encrypted = crypto.encrypt_json(secrets)

    try:
        # Its connection counts in the host's budget like a poll's.
        session = budget.connect(
            account.imap_host,
            account.username,
            "check",
            lambda: imap.open_account(
                account,
                credentials=credentials.loader(account, save=keep),
                connect_timeout=timeout,
                read_timeout=timeout,
            ),
            wait=min(SLOT_WAIT_SECONDS, timeout),
        )
    except budget.NoSlot as exc:
        detail = (
            f"not tried: the connection budget for {account.imap_host} is full "
            f"({exc.message}); this says nothing of the login: try again shortly, or raise "
            "CONNECTION_LIMITS for the host"
        )
        return CheckResult(ok=False, stage="budget", detail=detail)
    except ImapError as exc:
        return CheckResult(ok=False, stage=exc.stage, detail=exc.message)
    folders: list[FolderCheck] = []
    with session:
        try:
            names = mailbox_folders.current(account.folders, session)
        except ImapError as exc:
            return CheckResult(ok=False, stage="folder", detail=f"LIST failed: {exc.message}")
        for folder in names:
            try:
                count = session.select(folder).exists
            except ImapError as error:
                folders.append(FolderCheck(name=folder, ok=False, detail=error.message))
                if error.kind != ErrorKind.PROTOCOL:
                    break
                continue
            folders.append(
                FolderCheck(name=folder, ok=True, detail=f"{count} messages", messages=count)
            )
    failed = [check for check in folders if not check.ok]
    if failed:
        return CheckResult(
            ok=False,
            stage="folder",
            detail="; ".join(f"{check.name}: {check.detail}" for check in failed),
            folders=folders,
        )
    return CheckResult(ok=True, stage="folder", detail="ok", folders=folders)
