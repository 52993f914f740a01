"""Objects as files under LOCAL_STORAGE_DIR; a key can never name a path outside it.

A put is durable when it returns (the file and its directories fsynced), unless the
caller writes a batch with `sync=False` and makes it durable with `sync(keys)` before
relying on it (the poller, before the transaction that records the batch's rows): the
files are written first and fsynced together, several at once, and each directory once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from backend.models.enums import StorageBackend
from backend.storage.base import ObjectNotFound, StorageError

# A key naming a directory, or running through a file, names no object.
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_TMP_PREFIX = ".tmp-"
# Files fsynced at once by `sync`.
SYNC_THREADS = 8


class LocalStorage:
    name = StorageBackend.LOCAL

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        if not key or "\x00" in key:
            raise StorageError(f"invalid object key {key!r}")
        parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or not parts or parts[-1].startswith(_TMP_PREFIX):
            raise StorageError(f"object key {key!r} would leave the storage directory")
        # resolve() follows symlinks, so a link planted inside the root cannot lead out.
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"object key {key!r} would leave the storage directory")
        return path

    def put(
        self, key: str, data: bytes | BinaryIO, content_type: str, *, sync: bool = True
    ) -> None:
        """`sync=False`: not durable until `sync([key, ...])` has returned."""
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write(path, data, sync=sync)
            if sync:
                self._sync_directories([path])
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def sync(self, keys: Iterable[str]) -> None:
        """Make objects written with `sync=False` durable: each file, then each directory
        on the way to them (new entries and new directories), once."""
        paths = [self.path_for(key) for key in keys]
        try:
            # Several at once: the disk sees a deeper queue and the filesystem writes
            # its metadata in fewer rounds (1.7x faster than one by one on this
            # machine's ext4, docs/benchmarks.md). Threads per call: nothing to carry
            # across a fork.
            with ThreadPoolExecutor(max(1, min(SYNC_THREADS, len(paths)))) as pool:
                list(pool.map(lambda path: _fsync(path, os.O_RDONLY), paths))
            self._sync_directories(paths)
        except OSError as exc:
            raise StorageError(f"cannot make objects durable under {self.root}: {exc}") from exc

    def _sync_directories(self, paths: Iterable[Path]) -> None:
        directories: set[Path] = set()
        for path in paths:
            directory = path.parent
            while directory not in directories and directory.is_relative_to(self.root):
                directories.add(directory)
                directory = directory.parent
        # Deepest first: a new directory's entry in its parent is written after it.
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)

    @staticmethod
    def _write(path: Path, data: bytes | BinaryIO, *, sync: bool) -> None:
        # Write to a temporary file and rename it into place, so a crash never leaves
        # half an object under the real name (unsynced: the batch's rows are not
        # committed before `sync`, so a retry writes it again).
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, bytes | bytearray | memoryview):
                    handle.write(data)
                else:
                    shutil.copyfileobj(data, handle)
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return self.path_for(key).open("rb")
        except _MISSING as exc:
            raise ObjectNotFound(key) from exc

    def iter_chunks(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """Opens the file now, so a missing object raises here and not at the first chunk."""
        return self._chunks(self.open(key), chunk_size)

    @staticmethod
    def _chunks(handle: BinaryIO, chunk_size: int) -> Iterator[bytes]:
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
        self._prune(prefix)
        return count

    def _prune(self, prefix: str) -> None:
        """Remove the directories a deleted account leaves empty."""
        start = self._walk_start(prefix)
        if start is None or start == self.root:
            return
        for dirpath, _dirs, _files in os.walk(start, topdown=False):
            with contextlib.suppress(OSError):  # not empty: something else lives there
                os.rmdir(dirpath)

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def keys(self, prefix: str = "") -> Iterator[str]:
        start = self._walk_start(prefix)
        if start is None:
            return
        for dirpath, _dirs, files in os.walk(start):
            # One relative path per directory, not a Path per file: an audit lists a
            # folder of 100,000 objects (docs/benchmarks.md).
            relative = Path(dirpath).relative_to(self.root).as_posix()
            base = "" if relative == "." else f"{relative}/"
            for name in files:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = base + name
                if key.startswith(prefix):
                    yield key

    def _walk_start(self, prefix: str) -> Path | None:
        """The deepest directory that holds every key under the prefix (None: no such keys),
        so listing one account does not walk every account."""
        folder = prefix.rpartition("/")[0]
        start = self.path_for(folder) if folder else self.root
        return start if start.is_dir() else None


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
