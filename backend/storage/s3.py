"""Objects in an S3-compatible bucket: AWS S3, Aliyun OSS (virtual-hosted addressing),
MinIO (path addressing). `build_client` is the one place a boto3 S3 client is made."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from backend.config import Settings
from backend.models.enums import StorageBackend
from backend.storage.base import ObjectNotFound, StorageError

if TYPE_CHECKING:
    from botocore.awsrequest import AWSRequest
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# DeleteObjects takes at most 1000 keys per request.
_DELETE_BATCH = 1000


def build_client(
    settings: Settings,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    max_attempts: int | None = None,
) -> S3Client:
    """The S3 client, from settings; the timeouts and attempts can be tightened for a
    quick probe such as the health check."""
    secret = settings.s3_secret_access_key
    config = Config(
        signature_version="s3v4",
        connect_timeout=connect_timeout or settings.s3_connect_timeout,
        read_timeout=read_timeout or settings.s3_read_timeout,
        retries={
            "total_max_attempts": max_attempts or settings.s3_max_attempts,
            "mode": "standard",
        },
        s3={"addressing_style": settings.s3_addressing_style},
        # Since botocore 1.36 every upload carries a CRC32 trailer (aws-chunked), which
        # OSS and older MinIO refuse; checksums only where the API requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=config,
    )
    client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
    return client


def _add_content_md5(request: AWSRequest, **_: Any) -> None:
    """OSS and older MinIO refuse DeleteObjects without Content-MD5, which botocore no
    longer sends (it sends a CRC32 instead); AWS accepts both."""
    body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    request.headers["Content-MD5"] = base64.b64encode(digest).decode()


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """botocore's many exceptions as the two the rest of mailbeat knows."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFound(what) from exc
        raise StorageError(f"S3 {code or 'error'} on {what}: {error.get('Message', exc)}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 unavailable on {what}: {exc}") from exc


def build_writer(settings: Settings) -> S3Client:
    """The client for puts: one attempt, and no byte moving for S3_WRITE_TIMEOUT_SECONDS
    ends it. An S3 that accepts connections and never answers then costs a write seconds,
    not read timeout x attempts; the write goes to local files and is moved up later."""
    seconds = settings.s3_write_timeout_seconds
    return build_client(settings, connect_timeout=seconds, read_timeout=seconds, max_attempts=1)


class S3Storage:
    name = StorageBackend.S3

    def __init__(self, client: S3Client, bucket: str, writer: S3Client | None = None) -> None:
        self.client = client
        self.writer = writer or client
        self.bucket = bucket

    def put(self, key: str, data: bytes | BinaryIO, content_type: str) -> None:
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        elif not isinstance(data, bytes) and not data.seekable():
            data = data.read()  # botocore rewinds the body to retry, and needs its length
        # One PUT takes up to 5 GB; a seekable stream is read as it is sent, not held whole.
        # (upload_fileobj would also do multipart, but it closes the caller's stream, which
        # the fallback to local files still needs.)
        with _errors(key):
            self.writer.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        with _errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            with body:
                return body.read()

    def iter_chunks(self, key: str, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """Asks S3 now, so a missing object raises here and not at the first chunk."""
        with _errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return self._chunks(body, key, chunk_size)

    @staticmethod
    def _chunks(body: StreamingBody, key: str, chunk_size: int) -> Iterator[bytes]:
        with body, _errors(key):
            yield from body.iter_chunks(chunk_size)

    def delete(self, key: str) -> None:
        with _errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> int:
        count = 0
        batch: list[str] = []
        for key in self.keys(prefix):
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def _delete_batch(self, keys: list[str]) -> int:
        with _errors(f"{len(keys)} objects from {keys[0]}"):
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        if errors := response.get("Errors"):
            first = errors[0]
            raise StorageError(
                f"S3 refused to delete {len(errors)} of {len(keys)} objects, e.g. "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
            )
        return len(keys)

    def exists(self, key: str) -> bool:
        try:
            with _errors(key):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            return False
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        with _errors(f"listing {prefix or '/'}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"]

    def check(self) -> None:
        """Raises StorageError unless the bucket answers."""
        with _errors(f"bucket {self.bucket}"):
            self.client.head_bucket(Bucket=self.bucket)
