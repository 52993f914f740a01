"""XOAUTH2 access tokens: refreshed at the account's token endpoint when expired.

The token endpoint is called with a refresh token (RFC 6749 section 6); the answer's
access token (and refresh token, when the provider rotates it) replace the stored ones.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import httpx

from backend import netpolicy
from backend.config import get_settings
from backend.mailbox.imap import ImapAuthError, ImapConnectionError, is_encodable

# Refresh this long before the stated expiry: a token must survive the whole login.
EXPIRY_MARGIN_SECONDS = 60
# An RFC 6749 error code (invalid_grant, ...): shown as the reason; anything else the
# endpoint says is not repeated.
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def expires_at_epoch(value: Any) -> float | None:
    """`expires_at` as epoch seconds; stored as a number, ISO 8601 text is accepted too."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def needs_refresh(credentials: dict[str, Any], *, now: float | None = None) -> bool:
    if not credentials.get("access_token"):
        return True
    expires = expires_at_epoch(credentials.get("expires_at"))
    if expires is None:
        return False
    return expires - EXPIRY_MARGIN_SECONDS <= (now if now is not None else time.time())


def _client() -> httpx.Client:
    settings = get_settings()
    return netpolicy.http_client(
        timeout=settings.imap_read_timeout, connect_timeout=settings.imap_connect_timeout
    )


def refresh(credentials: dict[str, Any]) -> dict[str, Any]:
    """New credentials from the token endpoint. Raises ImapAuthError when the endpoint
    refuses (a revoked or expired refresh token) and ImapConnectionError when it cannot
    be reached, so the poll is classified like a login failure or an outage."""
    token_url = credentials.get("token_url")
    refresh_token = credentials.get("refresh_token")
    if not token_url or not refresh_token:
        raise ImapAuthError("the access token expired and there is no refresh token / token_url")
    # Saved before the policy (or in another environment): checked again before sending.
    problem = netpolicy.url_refusal(str(token_url), https=True)
    if problem is not None:
        raise ImapAuthError(f"the token URL is refused: {problem}")
    form = {"grant_type": "refresh_token", "refresh_token": str(refresh_token)}
    for name in ("client_id", "client_secret"):
        if credentials.get(name):
            form[name] = str(credentials[name])
    for name, value in form.items():
        if not is_encodable(value):
            # Stored before the API refused such text; the codec's own error would name
            # the character and where it is in the secret.
            raise ImapAuthError(
                f"the stored {name} is not valid Unicode text (a lone surrogate); "
                "set the oauth2 credentials again through the API"
            )
    try:
        with _client() as client:
            response = client.post(
                str(token_url), data=form, headers={"Accept": "application/json"}
            )
    except netpolicy.OutboundRefused as exc:
        raise ImapAuthError(f"the token URL is refused: {exc.message}") from exc
    except httpx.HTTPError as exc:
        raise ImapConnectionError(f"token endpoint unreachable: {type(exc).__name__}") from exc
    if response.status_code >= 500:
        raise ImapConnectionError(f"token endpoint answered {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict) or not body.get("access_token"):
        # The endpoint's error code (invalid_grant, ...) says why; never its tokens.
        code = body.get("error") if isinstance(body, dict) else None
        reason = code if isinstance(code, str) and _ERROR_CODE.match(code) else "no access_token"
        raise ImapAuthError(f"token refresh refused ({response.status_code}): {reason}")
    updated = dict(credentials)
    updated["access_token"] = str(body["access_token"])
    if body.get("refresh_token"):
        updated["refresh_token"] = str(body["refresh_token"])
    expires_in = body.get("expires_in")
    if isinstance(expires_in, int | float | str) and str(expires_in).isdigit():
        updated["expires_at"] = int(time.time()) + int(expires_in)
    else:
        updated["expires_at"] = None
    return updated
