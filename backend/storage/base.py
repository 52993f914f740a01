"""What every storage backend does, and how object keys are named."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import BinaryIO, Protocol
from urllib.parse import quote

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
# Longer (encoded) folder names are shortened; S3 keys end at 1024 bytes.
FOLDER_PART_MAX = 200


def key_part(value: str | int) -> str:
    """A readable, path-safe key segment for a file name: 'Bericht ä.pdf' or '../x'
    become 'Bericht__.pdf' and '.._x', never a separator or a bare '..'. Not one-to-one:
    only where something else (an index) keeps keys apart."""
    text = _UNSAFE.sub("_", str(value))[:200]
    return text if text not in ("", ".", "..") else f"_{text}_"


def folder_part(folder: str) -> str:
    """The folder's exact name, percent-encoded (UTF-8): one name, one segment, and the
    segment decodes back to the name, so look-alikes ('a/b' and 'a_b', 'Sent Items' and
    'Sent_Items', any two Cyrillic names) never share a key. '~' is encoded too: it marks
    a name too long for a key, shortened and made unique by its SHA-256."""
    text = quote(folder, safe="").replace("~", "%7E") or "%"
    if text.strip(".") == "":
        text = text.replace(".", "%2E")  # never '.' or '..' as a path segment
    if len(text) > FOLDER_PART_MAX:
        text = f"{text[:150]}~{hashlib.sha256(folder.encode()).hexdigest()}"
    return text


def account_prefix(account_id: int) -> str:
    return f"accounts/{account_id}/"


def message_key(account_id: int, folder: str, uidvalidity: int, uid: int) -> str:
    """accounts/{id}/{folder, percent-encoded}/{uidvalidity}/{uid}.eml: findable by hand
    in a bucket, one key per (account, folder, UIDVALIDITY, UID)."""
    return f"{account_prefix(account_id)}{folder_part(folder)}/{uidvalidity}/{uid}.eml"


def attachment_key(
    account_id: int, folder: str, uidvalidity: int, uid: int, *, index: int, safe_name: str
) -> str:
    """Beside the raw message: .../{uid}.attachments/{index}-{safe name} (the index keeps
    look-alike file names apart)."""
    return (
        f"{account_prefix(account_id)}{folder_part(folder)}/{uidvalidity}/{uid}.attachments/"
        f"{index}-{key_part(safe_name)}"
    )
