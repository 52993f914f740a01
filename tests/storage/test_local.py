from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from backend.storage.base import ObjectNotFound, StorageError, account_prefix, message_key
from backend.storage.local import LocalStorage
from tests.support.fsync import fsync_spy


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_round_trip(store: LocalStorage) -> None:
    key = message_key(7, "INBOX", 12345, 42)
    store.put(key, b"raw message", "message/rfc822")
    assert store.exists(key)
    assert store.get(key) == b"raw message"
    assert (store.root / "accounts/7/INBOX/12345/42.eml").read_bytes() == b"raw message"
    store.put(key, io.BytesIO(b"replaced from a stream"), "message/rfc822")
    assert store.get(key) == b"replaced from a stream"
    assert list(store.keys()) == [key]
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get(key)
    store.delete(key)  # deleting what is gone is fine


def test_streaming_read(store: LocalStorage) -> None:
    data = os.urandom(200_000)
    store.put("a/b", data, "application/octet-stream")
    chunks = list(store.iter_chunks("a/b", chunk_size=64 * 1024))
    assert len(chunks) == 4
    assert b"".join(chunks) == data


def test_missing_object_raises_before_streaming(store: LocalStorage) -> None:
    with pytest.raises(ObjectNotFound):
        store.iter_chunks("nothing/here")
    store.put("dir/file", b"x", "text/plain")
    with pytest.raises(ObjectNotFound):
        store.get("dir")  # a directory is no object
    with pytest.raises(ObjectNotFound):
        store.get("dir/file/below")


ESCAPES = [
    "..",
    "../outside",
    "../../etc/passwd",
    "a/../../outside",
    "a/./../../outside",
    "..\\outside",
    "a\\..\\..\\outside",
    "x\x00y",
    "",
    ".",
    "/",
    "a/.tmp-123",
]


@pytest.mark.parametrize("key", ESCAPES)
def test_keys_that_would_leave_the_directory_are_refused(store: LocalStorage, key: str) -> None:
    with pytest.raises(StorageError):
        store.put(key, b"x", "text/plain")
    with pytest.raises(StorageError):
        store.get(key)
    assert not (store.root.parent / "outside").exists()


@pytest.mark.parametrize(
    "key",
    ["/etc/passwd", "//etc/passwd", "\\etc\\passwd", "C:\\x", "%2e%2e/x", "é/\n\t*?|<>\udcff"],
)
def test_absolute_and_odd_keys_stay_inside(store: LocalStorage, key: str) -> None:
    store.put(key, b"inside", "text/plain")
    assert store.get(key) == b"inside"
    path = store.path_for(key)
    assert path.is_relative_to(store.root)
    assert sorted(p for p in store.root.parent.rglob("*") if p.is_file()) == [path]


def test_symlink_inside_the_root_does_not_lead_out(store: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "link").symlink_to(outside)
    with pytest.raises(StorageError):
        store.put("link/x", b"x", "text/plain")
    assert list(outside.iterdir()) == []


def test_failed_write_leaves_nothing(store: LocalStorage) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: object) -> int:
            raise OSError("connection dropped")

    store.put("a/b", b"old", "text/plain")
    with pytest.raises(StorageError):
        store.put("a/b", io.BufferedReader(Broken()), "text/plain")
    assert store.get("a/b") == b"old"
    assert [p.name for p in (store.root / "a").iterdir()] == ["b"]


def test_delete_prefix_removes_one_account(store: LocalStorage) -> None:
    for account in (1, 11, 2):
        for uid in range(3):
            store.put(message_key(account, "INBOX", 1, uid), b"m", "message/rfc822")
    assert store.delete_prefix(account_prefix(1)) == 3
    assert not (store.root / "accounts/1").exists()
    assert len(list(store.keys(account_prefix(11)))) == 3
    assert len(list(store.keys())) == 6
    assert store.delete_prefix(account_prefix(1)) == 0


def test_a_batch_is_durable_after_its_sync_each_file_and_directory_fsynced_once(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = fsync_spy(monkeypatch)
    keys = [message_key(7, "INBOX", 1, uid) for uid in (1, 2, 3)] + ["accounts/7/x/y/z"]
    for key in keys:
        store.put(key, key.encode(), "text/plain", sync=False)
    # Each file's data, under its temporary name before the rename; no directory yet.
    assert all(path.name.startswith(".tmp-") for path, _inode in synced)
    assert {inode for _path, inode in synced} == {store.path_for(key).stat().st_ino for key in keys}
    written = len(synced)

    store.sync(keys)

    directories = [path for path, _inode in synced[written:]]
    assert len(directories) == len(set(directories))
    assert set(directories) == {
        store.root / "accounts/7/INBOX/1",
        store.root / "accounts/7/INBOX",
        store.root / "accounts/7/x/y",
        store.root / "accounts/7/x",
        store.root / "accounts/7",
        store.root / "accounts",
        store.root,
    }
    assert [store.get(key) for key in keys] == [key.encode() for key in keys]


def test_a_single_put_is_durable_when_it_returns(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = fsync_spy(monkeypatch)
    store.put("a/b", b"one", "text/plain")
    # The temporary file (renamed into place afterwards), then the directories.
    assert [path.parent for path, _inode in synced[:1]] == [store.root / "a"]
    assert synced[0][1] == (store.root / "a/b").stat().st_ino
    assert [path for path, _inode in synced[1:]] == [store.root / "a", store.root]


def test_syncing_a_missing_object_fails(store: LocalStorage) -> None:
    with pytest.raises(StorageError):
        store.sync(["never/written"])


def test_a_directory_pruned_after_a_put_is_made_again(store: LocalStorage) -> None:
    key = message_key(3, "INBOX", 1, 1)
    store.put(key, b"first", "message/rfc822")
    assert store.delete_prefix(account_prefix(3)) == 1
    assert not (store.root / "accounts/3").exists()
    store.put(key, b"again", "message/rfc822", sync=False)
    store.sync([key])
    assert store.get(key) == b"again"
