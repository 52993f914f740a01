"""What every storage backend does, and how object keys are named."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from backend.models.enums import StorageBackend


class StorageError(Exception):
    """A backend could not do what was asked (unreachable, refused, timed out)."""


class ObjectNotFound(StorageError):
    pass


class Storage(Protocol):
    name: StorageBackend  # recorded on each row so reads find the object

    def put(self, key: str, data: bytes | BinaryIO, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def iter_chunks(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def keys(self, prefix: str = "") -> Iterator[str]: ...


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def key_part(value: str | int) -> str:
    """A readable, path-safe key segment: folder names like 'INBOX/Sent Items' or '../x'
    become 'INBOX_Sent_Items' and '.._x', never a separator or a bare '..'."""
    text = _UNSAFE.sub("_", str(value))[:200]
    return text if text not in ("", ".", "..") else f"_{text}_"


def account_prefix(account_id: int) -> str:
    return f"accounts/{account_id}/"


def message_key(account_id: int, folder: str, uidvalidity: int, uid: int) -> str:
    """accounts/{id}/{folder}/{uidvalidity}/{uid}.eml: findable by hand in a bucket."""
    return f"{account_prefix(account_id)}{key_part(folder)}/{uidvalidity}/{uid}.eml"


def attachment_key(
    account_id: int, folder: str, uidvalidity: int, uid: int, *, index: int, safe_name: str
) -> str:
    """Beside the raw message: .../{uid}.attachments/{index}-{safe name}."""
    return (
        f"{account_prefix(account_id)}{key_part(folder)}/{uidvalidity}/{uid}.attachments/"
        f"{index}-{key_part(safe_name)}"
    )
