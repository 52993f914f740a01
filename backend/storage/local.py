"""Objects as files under LOCAL_STORAGE_DIR; a key can never name a path outside it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from backend.storage.base import ObjectNotFound, StorageError


class LocalStorage:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        if not key or "\x00" in key:
            raise StorageError(f"invalid object key {key!r}")
        parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or not parts:
            raise StorageError(f"object key {key!r} would leave the storage directory")
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"object key {key!r} would leave the storage directory")
        return path

    def put(self, key: str, data: bytes | BinaryIO, content_type: str) -> None:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename it into place, so a crash never leaves
        # half an object under the real name.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, bytes | bytearray | memoryview):
                    handle.write(data)
                else:
                    shutil.copyfileobj(data, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def iter_chunks(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        try:
            handle = self.path_for(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        with handle:
            while chunk := handle.read(chunk_size):
                yield chunk

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        for key in list(self.keys(prefix)):
            self.delete(key)
            count += 1
        return count

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def keys(self, prefix: str = "") -> Iterator[str]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key
