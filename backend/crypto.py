"""Mailbox secrets at rest: Fernet, with MultiFernet so keys can be rotated."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from backend.config import get_settings


class SecretDecryptError(RuntimeError):
    """A stored secret cannot be read with any configured key."""


@lru_cache
def _fernet() -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in get_settings().fernet_keys()])
    except ValueError as exc:
        raise ValueError(
            "ENCRYPTION_KEY must be one or more comma-separated Fernet keys "
            "(32 url-safe base64-encoded bytes)"
        ) from exc


# "surrogatepass": a lone surrogate (JSON's "\ud800") is a str Python holds but UTF-8
# cannot encode; it is kept as it came instead of failing with an error that names the
# character and its position. The API refuses such text; this is for values from
# elsewhere (the CLI, rows written before), which the IMAP layer then refuses to send.
_ERRORS = "surrogatepass"


def encrypt(plain: str) -> str:
    return _fernet().encrypt(plain.encode("utf-8", _ERRORS)).decode()


def decrypt(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode("utf-8", _ERRORS)
    except InvalidToken as exc:
        raise SecretDecryptError(
            "a stored secret cannot be decrypted with ENCRYPTION_KEY (was the key changed "
            "without keeping the old one in the list?)"
        ) from exc


def encrypt_json(data: dict[str, Any]) -> str:
    return encrypt(json.dumps(data, separators=(",", ":")))


def decrypt_json(token: str) -> dict[str, Any]:
    value = json.loads(decrypt(token))
    if not isinstance(value, dict):
        raise SecretDecryptError("a stored secret is not a JSON object")
    return value


def rotate(token: str) -> str:
    """Re-encrypt a token under the newest key (after ENCRYPTION_KEY gained a new first key)."""
    return _fernet().rotate(token.encode()).decode()


def reset_cache() -> None:
    _fernet.cache_clear()
