"""The storage the rest of mailbeat uses: put returns the backend that holds the object,
and reads go to the backend a row names.

S3 (or OSS / MinIO) when configured; local files when it is not, and for any write S3
fails, so nothing is lost while it is down. `sync_fallback_objects` (the storage.sync
task) moves those fallback objects up once S3 answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, BinaryIO, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import redis
from backend.config import get_settings
from backend.models import AccountCleanup, Attachment, Message, StorageBackend, utcnow
from backend.storage.base import ObjectNotFound, Storage, StorageError, account_prefix
from backend.storage.local import LocalStorage
from backend.storage.s3 import S3Storage, build_client, build_writer

log = logging.getLogger(__name__)

MESSAGE_CONTENT_TYPE = "message/rfc822"
# A deleted account's objects are looked for until this long after its polls' time limit.
CLEANUP_MARGIN_SECONDS = 60
SYNC_BATCH_SIZE = 100
# /health must answer quickly even when S3 hangs.
HEALTH_TIMEOUT_SECONDS = 2.0
# The shared breaker: a write asks Redis whether another process found S3 failing. A
# breaker that waits on Redis would defeat its purpose: a short timeout, no retries, and
# a Redis that did not answer is left alone for a while.
BREAKER_KEY = "mailbeat:storage:s3-failing"
BREAKER_REDIS_TIMEOUT_SECONDS = 0.5
REDIS_QUIET_SECONDS = 30.0

T = TypeVar("T")
_BYTES = (bytes, bytearray, memoryview)


@lru_cache
def local_storage() -> LocalStorage:
    return LocalStorage(get_settings().local_storage_dir)


@lru_cache
def s3_storage() -> S3Storage | None:
    """The configured bucket, or None (said once in the log) when S3 is not configured."""
    settings = get_settings()
    if not settings.s3_bucket:
        log.log(
            logging.WARNING if settings.environment == "production" else logging.INFO,
            "object storage is not configured (S3_BUCKET is empty): objects are kept as "
            "local files under %s",
            settings.local_storage_dir,
        )
        return None
    return S3Storage(build_client(settings), settings.s3_bucket, build_writer(settings))


@lru_cache
def _s3_probe() -> S3Storage | None:
    settings = get_settings()
    if not settings.s3_bucket:
        return None
    client = build_client(
        settings,
        connect_timeout=HEALTH_TIMEOUT_SECONDS,
        read_timeout=HEALTH_TIMEOUT_SECONDS,
        max_attempts=1,
    )
    return S3Storage(client, settings.s3_bucket)


class _Breaker:
    """After an S3 write fails, writes go straight to local files for a while instead of
    each one waiting out S3's timeouts again. The open state is kept in Redis too, so the
    process that finds S3 failing spares every other process (each worker process, the
    API) that wait; while Redis does not answer, each process keeps its own."""

    def __init__(self) -> None:
        self.open_until = 0.0
        self._redis_quiet_until = 0.0

    def closed(self) -> bool:
        now = time.monotonic()
        if now < self.open_until:
            return False
        shared = self._shared(lambda client: _pipeline(client, "pttl", "get"))
        if shared is None or shared[0] <= 0:
            return True
        ttl_ms, reason = shared
        self.open_until = now + ttl_ms / 1000
        log.warning(
            "S3 writes go to local files for the next %.0fs: another process found S3 "
            "failing (%s); the storage.sync task moves them up later",
            ttl_ms / 1000,
            (reason or b"").decode(errors="replace"),
        )
        return False

    def trip(self, seconds: float, reason: str) -> None:
        self.open_until = time.monotonic() + seconds
        self._shared(lambda client: client.set(BREAKER_KEY, reason[:300], px=int(seconds * 1000)))

    def reset(self) -> None:
        self.open_until = 0.0
        self._shared(lambda client: client.delete(BREAKER_KEY))

    def forget(self) -> None:
        """This process's state only (settings changed)."""
        self.open_until = 0.0
        self._redis_quiet_until = 0.0

    def _shared(self, call: Callable[[redis.Redis], T]) -> T | None:
        if time.monotonic() < self._redis_quiet_until:
            return None
        try:
            return call(_redis())
        except redis.RedisError as exc:
            self._redis_quiet_until = time.monotonic() + REDIS_QUIET_SECONDS
            log.warning(
                "S3 breaker: Redis does not answer (%s); this process keeps its own for %.0fs",
                type(exc).__name__,
                REDIS_QUIET_SECONDS,
            )
            return None


def _pipeline(client: redis.Redis, *commands: str) -> list[Any]:
    with client.pipeline(transaction=False) as pipe:
        for command in commands:
            getattr(pipe, command)(BREAKER_KEY)
        return pipe.execute()


@lru_cache
def _redis() -> redis.Redis:
    return redis.connect(timeout=BREAKER_REDIS_TIMEOUT_SECONDS, retries=False)


_breaker = _Breaker()


def backend(name: str) -> Storage:
    if name == StorageBackend.LOCAL:
        return local_storage()
    if name == StorageBackend.S3:
        s3 = s3_storage()
        if s3 is None:
            raise StorageError("the object is in S3, but S3 is not configured (S3_BUCKET)")
        return s3
    raise StorageError(f"unknown storage backend {name!r}")


def backends() -> list[Storage]:
    s3 = s3_storage()
    return [local_storage()] if s3 is None else [s3, local_storage()]


def put_object(
    key: str, data: bytes | BinaryIO, content_type: str, *, sync: bool = True
) -> StorageBackend:
    """Store an object; returns the backend that now holds it, which the caller records
    on the row. An S3 object is durable when this returns; a local one with `sync=False`
    only once `sync_local` has been called with its key (a batch's objects, together)."""
    s3 = s3_storage()
    if s3 is not None and _breaker.closed():
        if not isinstance(data, _BYTES) and not data.seekable():
            data = data.read()  # a failed upload must be able to start over on local files
        start = 0 if isinstance(data, _BYTES) else data.tell()
        try:
            s3.put(key, data, content_type)
            return s3.name
        except StorageError as exc:
            seconds = get_settings().s3_retry_after_seconds
            _breaker.trip(seconds, str(exc))
            log.warning(
                "S3 write failed; objects go to local files for the next %ss and the "
                "storage.sync task moves them up later: %s",
                seconds,
                exc,
            )
            if not isinstance(data, _BYTES):
                data.seek(start)
    local = local_storage()
    local.put(key, data, content_type, sync=sync)
    return local.name


def preferred_backend() -> StorageBackend:
    """Where `put_object` writes while S3 answers (LOCAL when it is not configured)."""
    return StorageBackend.S3 if s3_storage() is not None else StorageBackend.LOCAL


def sync_local(keys: Iterable[str]) -> None:
    """Make the local objects written with `sync=False` durable (fsync each file, then
    each directory once)."""
    local_storage().sync(keys)


def _read(backend_name: str, key: str, read: Callable[[Storage], T]) -> T:
    """Read from the backend the row names; if the object is not there, from the other
    one: a sync run may have moved it and failed to commit the row."""
    named = backend(backend_name)
    try:
        return read(named)
    except ObjectNotFound:
        for other in backends():
            if other.name != named.name:
                try:
                    return read(other)
                except StorageError:
                    pass
        raise


def get_object(backend_name: str, key: str) -> bytes:
    return _read(backend_name, key, lambda store: store.get(key))


def iter_object(backend_name: str, key: str) -> Iterator[bytes]:
    """The object in chunks. Nothing is asked before the first next(), which raises
    ObjectNotFound or StorageError, so a caller can read one chunk before it commits to
    a response."""
    yield from _read(backend_name, key, lambda store: store.iter_chunks(key))


def delete_object(backend_name: str, key: str) -> None:
    backend(backend_name).delete(key)


def delete_prefix(prefix: str) -> int:
    """Delete everything under a prefix in every backend (an account's objects); returns
    how many objects went. S3 goes first: when it fails (StorageError) the local files
    are still there too, and the whole delete can simply be repeated."""
    if not prefix.strip("/"):
        raise StorageError("refusing to delete every object (empty prefix)")
    return sum(store.delete_prefix(prefix) for store in backends())


def health() -> tuple[bool, str]:
    """(healthy, what): which backend writes go to, and whether S3 answers."""
    probe = _s3_probe()
    if probe is None:
        return True, "local files (object storage not configured)"
    try:
        probe.check()
    except StorageError as exc:
        return False, f"S3 bucket {probe.bucket} not answering, writes go to local files: {exc}"
    if not _breaker.closed():
        return True, f"S3 bucket {probe.bucket} answers; writes go to local files until retry"
    return True, f"S3 bucket {probe.bucket}"


def purge_deleted_accounts(session: Session) -> int:
    """Delete the stored objects of deleted accounts (AccountCleanup records). A record
    stays until a pass after the poll time limit: a poll running when its account was
    deleted may still write an object, and only a later pass deletes that. Returns how
    many objects went. Only flushes."""
    settings = get_settings()
    grace = timedelta(seconds=settings.poll_time_limit_seconds + CLEANUP_MARGIN_SECONDS)
    removed = 0
    cleanups = session.scalars(
        select(AccountCleanup).order_by(AccountCleanup.id).with_for_update(skip_locked=True)
    ).all()
    for cleanup in cleanups:
        started = utcnow()
        try:
            removed += delete_prefix(account_prefix(cleanup.account_id))
        except StorageError as exc:
            cleanup.attempts += 1
            cleanup.last_error = str(exc)[:300]
            log.warning(
                "deleted account %s: its objects could not be deleted yet (attempt %s): %s",
                cleanup.account_id,
                cleanup.attempts,
                cleanup.last_error,
            )
            continue
        if started - cleanup.deleted_at > grace:
            session.delete(cleanup)
    session.flush()
    if removed:
        log.info("deleted %s stored objects of deleted accounts", removed)
    return removed


@dataclass
class SyncProgress:
    moved: int = 0  # now in S3, row updated, local copy gone
    missing: int = 0  # the row says local, but no backend holds the object
    failed: int = 0  # S3 refused; left on local files for the next run
    # The next batch starts after these ids.
    message_id: int = 0
    attachment_id: int = 0
    done: bool = False

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items() if k in ("moved", "missing", "failed")}


def sync_fallback_objects(
    session: Session, progress: SyncProgress | None = None, *, batch_size: int = SYNC_BATCH_SIZE
) -> SyncProgress:
    """Move one batch of objects that fell back to local files up to S3, and point their
    rows at S3. Only flushes: the caller commits, then calls again with the returned
    progress until `.done`. Stops early when S3 fails (it is down again)."""
    progress = progress or SyncProgress()
    s3 = s3_storage()
    if s3 is None:
        progress.done = True
        return progress
    # Rows are locked for the batch, so two runs never move the same object and an
    # account deleted meanwhile waits, then deletes the objects where they landed.
    messages = session.scalars(
        select(Message)
        .where(Message.storage_backend == StorageBackend.LOCAL, Message.id > progress.message_id)
        .order_by(Message.id)
        .limit(batch_size)
        .with_for_update(skip_locked=True)
    ).all()
    for message in messages:
        progress.message_id = message.id
        if message.storage_key and not _sync_row(s3, message, MESSAGE_CONTENT_TYPE, progress):
            progress.done = True
            break
    else:
        attachments = session.scalars(
            select(Attachment)
            .where(
                Attachment.storage_backend == StorageBackend.LOCAL,
                Attachment.id > progress.attachment_id,
            )
            .order_by(Attachment.id)
            .limit(batch_size)
            .with_for_update(skip_locked=True)
        ).all()
        for attachment in attachments:
            progress.attachment_id = attachment.id
            if not _sync_row(s3, attachment, attachment.content_type, progress):
                progress.done = True
                break
        else:
            progress.done = len(messages) < batch_size and len(attachments) < batch_size
    session.flush()
    return progress


def _sync_row(
    s3: S3Storage, row: Message | Attachment, content_type: str, progress: SyncProgress
) -> bool:
    """Move one row's object; False when S3 failed and the run should stop."""
    local = local_storage()
    key = row.storage_key
    assert key is not None
    try:
        try:
            with local.open(key) as handle:
                s3.put(key, handle, content_type)
        except ObjectNotFound:
            # An earlier run moved it but its row update was not committed.
            if not s3.exists(key):
                log.error("object %s (%s %s) is in no backend", key, type(row).__name__, row.id)
                progress.missing += 1
                return True
        # Deleted locally only once S3 shows it.
        if not s3.exists(key):
            raise StorageError(f"S3 accepted {key} but does not show it")
    except StorageError as exc:
        log.warning("moving fallback objects to S3 stopped, will retry next run: %s", exc)
        progress.failed += 1
        return False
    _breaker.reset()
    row.storage_backend = s3.name
    local.delete(key)
    progress.moved += 1
    return True


def reset_cache() -> None:
    local_storage.cache_clear()
    s3_storage.cache_clear()
    _s3_probe.cache_clear()
    if _redis.cache_info().currsize:
        _redis().close()
    _redis.cache_clear()
    _breaker.forget()
