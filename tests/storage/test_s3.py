from __future__ import annotations

import base64
import hashlib
import io
import os
from typing import Any

import pytest

from backend.config import get_settings
from backend.storage import s3 as s3_module
from backend.storage.base import ObjectNotFound, StorageError, account_prefix, message_key
from backend.storage.s3 import S3Storage, build_client
from tests.support.s3 import MotoS3


@pytest.fixture
def store(s3_bucket: str) -> S3Storage:
    return S3Storage(build_client(get_settings()), s3_bucket)


def test_round_trip(store: S3Storage, moto_s3: MotoS3) -> None:
    key = message_key(7, "INBOX", 12345, 42)
    store.put(key, b"raw message", "message/rfc822")
    assert store.exists(key)
    assert store.get(key) == b"raw message"
    head = moto_s3.client().head_object(Bucket=store.bucket, Key=key)
    assert head["ContentType"] == "message/rfc822"
    store.put(key, io.BytesIO(b"replaced from a stream"), "message/rfc822")
    assert store.get(key) == b"replaced from a stream"
    assert list(store.keys()) == [key]
    store.delete(key)
    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.get(key)
    store.delete(key)


def test_streaming_read(store: S3Storage) -> None:
    data = os.urandom(200_000)
    store.put("a/b", io.BytesIO(data), "application/octet-stream")
    chunks = list(store.iter_chunks("a/b", chunk_size=64 * 1024))
    assert len(chunks) == 4
    assert b"".join(chunks) == data


def test_missing_object_raises_before_streaming(store: S3Storage) -> None:
    with pytest.raises(ObjectNotFound):
        store.iter_chunks("nothing/here")


def test_delete_prefix_in_batches(store: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)
    for account in (1, 11):
        for uid in range(5):
            store.put(message_key(account, "INBOX", 1, uid), b"m", "message/rfc822")
    assert store.delete_prefix(account_prefix(1)) == 5
    assert list(store.keys(account_prefix(1))) == []
    assert len(list(store.keys())) == 5


def test_missing_bucket_is_a_storage_error(store: S3Storage) -> None:
    missing = S3Storage(store.client, "no-such-bucket")
    with pytest.raises(StorageError) as info:
        missing.put("a", b"x", "text/plain")
    assert not isinstance(info.value, ObjectNotFound)
    with pytest.raises(StorageError):
        missing.check()
    store.check()


def test_unreachable_endpoint_is_a_storage_error(set_env, s3_bucket: str) -> None:
    from tests.support.net import free_port

    set_env(S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", S3_MAX_ATTEMPTS=1)
    store = S3Storage(build_client(get_settings()), s3_bucket)
    with pytest.raises(StorageError):
        store.put("a", b"x", "text/plain")
    with pytest.raises(StorageError):
        store.exists("a")


@pytest.mark.parametrize("style", ["path", "virtual", "auto"])
def test_client_follows_the_settings(set_env, style: str) -> None:
    set_env(
        S3_BUCKET="b",
        S3_ENDPOINT_URL="https://oss-cn-hangzhou.aliyuncs.com",
        S3_ADDRESSING_STYLE=style,
        S3_CONNECT_TIMEOUT=3,
        S3_READ_TIMEOUT=7,
        S3_MAX_ATTEMPTS=4,
    )
    config: Any = build_client(get_settings()).meta.config  # botocore-stubs omit these
    assert config.s3["addressing_style"] == style
    assert config.signature_version == "s3v4"
    assert (config.connect_timeout, config.read_timeout) == (3, 7)
    # total attempts, the first included (botocore's max_attempts counts retries only)
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}


def test_delete_objects_carries_content_md5(store: S3Storage) -> None:
    """OSS and older MinIO refuse DeleteObjects without it; botocore no longer adds it."""
    seen: list[tuple[dict[str, str], bytes]] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append((dict(request.headers), request.body))

    store.client.meta.events.register("before-send.s3.DeleteObjects", capture)
    store.put("p/a", b"x", "text/plain")
    assert store.delete_prefix("p/") == 1
    assert len(seen) == 1
    headers, body = seen[0]
    assert b"<Key>p/a</Key>" in body
    assert base64.b64decode(headers["Content-MD5"]) == hashlib.md5(body).digest()
