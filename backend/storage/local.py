"""Objects as files under LOCAL_STORAGE_DIR; a key can never name a path outside it.

A put is durable when it returns (the file and its directories fsynced), unless the
caller writes a batch with `sync=False` and makes it durable with `sync(keys)` before
relying on it (the poller, before the transaction that records the batch's rows): each
file is fsynced by the put, in the caller's writing threads while the batch is parsed,
and `sync` fsyncs each directory once.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from backend.models.enums import StorageBackend
from backend.storage.base import ObjectNotFound, StorageError

# A key naming a directory, or running through a file, names no object.
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
_TMP_PREFIX = ".tmp-"
# Directories a store remembers as checked and made (then it forgets them all).
DIRECTORIES_MAX = 4096
COPY_CHUNK = 1024 * 1024

_names = itertools.count()


class LocalStorage:
    name = StorageBackend.LOCAL

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # Directories puts have checked and made, by the key's parts.
        self._directories: dict[tuple[str, ...], str] = {}

    def path_for(self, key: str) -> Path:
        parts = self._parts(key)
        # resolve() follows symlinks, so a link planted inside the root cannot lead out.
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise StorageError(f"object key {key!r} would leave the storage directory")
        return path

    @staticmethod
    def _parts(key: str) -> tuple[str, ...]:
        if not key or "\x00" in key:
            raise StorageError(f"invalid object key {key!r}")
        parts = tuple(p for p in key.replace("\\", "/").split("/") if p not in ("", "."))
        if any(p == ".." for p in parts) or not parts or parts[-1].startswith(_TMP_PREFIX):
            raise StorageError(f"object key {key!r} would leave the storage directory")
        return parts

    def put(
        self, key: str, data: bytes | BinaryIO, content_type: str, *, sync: bool = True
    ) -> None:
        """`sync=False`: not durable until `sync([key, ...])` has returned (the file is,
        its directories' entries are not)."""
        try:
            directory, name = self._target(key)
            try:
                _write(directory, name, data)
            except FileNotFoundError:
                # Its directory was pruned since it was made (an account deleted and
                # added again): make it again, once.
                self._directories.pop(self._parts(key)[:-1], None)
                directory, name = self._target(key)
                _write(directory, name, data)
            if sync:
                self._sync_directories([directory])
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def _target(self, key: str) -> tuple[str, str]:
        """The directory a put writes the key to, and the file's name: the directory
        checked (`path_for`) and made once per process, not at every put; the thousands
        of puts of a first sync go to a few directories. Strings, not paths: a Path per
        file cost more than its write. Renaming onto a link replaces the link, so the
        name itself needs no check."""
        parts = self._parts(key)
        directory = self._directories.get(parts[:-1])
        if directory is None:
            path = self.path_for(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            if len(self._directories) >= DIRECTORIES_MAX:
                self._directories.clear()
            directory = self._directories[parts[:-1]] = str(path.parent)
        return directory, parts[-1]

    def sync(self, keys: Iterable[str]) -> None:
        """Make objects written with `sync=False` durable: each directory on the way to
        them (new entries and new directories), once. Their files were fsynced by the
        put, in the writing thread, off the batch's commit."""
        try:
            directories: set[str] = set()
            for key in keys:
                directory, name = self._target(key)
                if not os.path.isfile(f"{directory}/{name}"):
                    raise FileNotFoundError(f"{directory}/{name} was never written")
                directories.add(directory)
            self._sync_directories(directories)
        except OSError as exc:
            raise StorageError(f"cannot make objects durable under {self.root}: {exc}") from exc

    def _sync_directories(self, leaves: Iterable[str]) -> None:
        directories: set[Path] = set()
        for leaf in leaves:
            directory = Path(leaf)
            while directory not in directories and directory.is_relative_to(self.root):
                directories.add(directory)
                directory = directory.parent
        # Deepest first: a new directory's entry in its parent is written after it.
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)

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


def _write(directory: str, name: str, data: bytes | BinaryIO) -> None:
    # Write to a temporary file, fsync it and rename it into place, so a crash never
    # leaves half an object under the real name.
    fd, tmp = _create(directory)
    try:
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                _write_all(fd, data)
            else:
                while chunk := data.read(COPY_CHUNK):
                    _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, f"{directory}/{name}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _create(directory: str) -> tuple[int, str]:
    """A new temporary file in `directory`: its descriptor and path. Named by process
    and counter, not by random bytes (mkstemp's) per file; a name left by a dead
    process with this pid is skipped."""
    while True:
        tmp = f"{directory}/{_TMP_PREFIX}{os.getpid()}-{next(_names)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
