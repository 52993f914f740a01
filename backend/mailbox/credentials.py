"""An account's IMAP secrets: decrypted for a login; refreshed XOAUTH2 tokens saved."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import update

from backend import crypto
from backend.db import session_scope
from backend.mailbox import oauth
from backend.mailbox.imap import ImapAuthError
from backend.models import Account, AuthMethod

Save = Callable[[dict[str, Any]], None]


def loader(account: Account, *, save: Save | None = None) -> Callable[[bool], dict[str, Any]]:
    """`load(force_refresh)` for `imap.open_account`: decrypt the account's secrets; for
    XOAUTH2, refresh an expired access token (or any, when forced after a refused login)
    and hand the new tokens to `save` (by default: committed at once, on their own)."""
    keep = save or _committer(account.id)

    def load(force_refresh: bool) -> dict[str, Any]:
        try:
            credentials = crypto.decrypt_json(account.credentials_encrypted)
        except crypto.SecretDecryptError as exc:
            raise ImapAuthError(str(exc)) from exc
        if account.auth_method == AuthMethod.OAUTH2 and (
            force_refresh or oauth.needs_refresh(credentials)
        ):
            credentials = oauth.refresh(credentials)
            keep(credentials)
        return credentials

    return load


def _committer(account_id: int) -> Save:
    def save(credentials: dict[str, Any]) -> None:
        # Committed at once: the provider may already have invalidated the old refresh token.
        with session_scope() as session:
            session.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(credentials_encrypted=crypto.encrypt_json(credentials))
            )

    return save
