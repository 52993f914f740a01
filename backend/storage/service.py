"""The storage the rest of mailbeat uses: put returns the backend that holds the object,
and reads go to the backend a row names.

Until the object-storage issue lands this is local files only; S3 and the fallback
plug in here without changing callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import BinaryIO

from backend.config import get_settings
from backend.storage.base import Storage, StorageError
from backend.storage.local import LocalStorage


@lru_cache
def local_storage() -> LocalStorage:
    return LocalStorage(get_settings().local_storage_dir)


def backend(name: str) -> Storage:
    if name == "local":
        return local_storage()
    raise StorageError(f"unknown storage backend {name!r}")


def put_object(key: str, data: bytes | BinaryIO, content_type: str) -> str:
    """Store an object; returns the name of the backend that now holds it."""
    store = local_storage()
    store.put(key, data, content_type)
    return store.name


def get_object(backend_name: str, key: str) -> bytes:
    return backend(backend_name).get(key)


def iter_object(backend_name: str, key: str) -> Iterator[bytes]:
    return backend(backend_name).iter_chunks(key)


def delete_object(backend_name: str, key: str) -> None:
    backend(backend_name).delete(key)


def delete_prefix(prefix: str) -> int:
    """Delete everything under a prefix in every backend (an account's objects)."""
    return local_storage().delete_prefix(prefix)


def reset_cache() -> None:
    local_storage.cache_clear()
