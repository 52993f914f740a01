from __future__ import annotations

import threading
import time

from backend.config import get_settings
from backend.mailbox.lock import (
    EXPIRY_MARGIN_SECONDS,
    MailboxLock,
    lock_key,
    mailbox_lock,
    rerun_requested,
)
from tests.support.redis_db import RedisDb


def test_one_holder_at_a_time(redis_db: RedisDb) -> None:
    first, second = MailboxLock(1), MailboxLock(1)
    assert first.acquire()
    assert not second.acquire()
    assert MailboxLock(2).acquire()  # another mailbox is independent
    assert first.release()
    assert second.acquire()


def test_expiry_outlasts_the_hard_time_limit(redis_db: RedisDb) -> None:
    lock = MailboxLock(1)
    assert lock.acquire()
    ttl = redis_db.client().ttl(lock_key(1))
    limit = get_settings().poll_time_limit_seconds
    assert limit < ttl <= limit + EXPIRY_MARGIN_SECONDS
    assert redis_db.client().get(lock_key(1)) == lock.token.encode()


def test_only_the_holder_releases(redis_db: RedisDb) -> None:
    stale = MailboxLock(1, expiry=1)
    assert stale.acquire()
    redis_db.client().delete(lock_key(1))  # as if it had expired
    current = MailboxLock(1)
    assert current.acquire()
    assert not stale.release()  # must not delete the lock the current poll holds
    assert redis_db.client().get(lock_key(1)) == current.token.encode()
    assert current.release()
    assert not redis_db.client().exists(lock_key(1))


def test_context_manager_releases_and_reports(redis_db: RedisDb) -> None:
    with mailbox_lock(1) as held:
        assert held
        with mailbox_lock(1) as again:
            assert not again
        assert redis_db.client().exists(lock_key(1))  # the refused one released nothing
    assert not redis_db.client().exists(lock_key(1))


def test_contending_threads_never_overlap(redis_db: RedisDb) -> None:
    inside = 0
    overlaps = 0
    entered = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, overlaps, entered
        for _ in range(30):
            with mailbox_lock(7) as held:
                if not held:
                    continue
                with guard:
                    inside += 1
                    entered += 1
                    overlaps += inside > 1
                time.sleep(0.002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert entered > 0
    assert overlaps == 0


def test_a_refused_poll_leaves_one_rerun_request_for_the_holder(redis_db: RedisDb) -> None:
    with mailbox_lock(1) as held:
        assert held
        for _ in range(3):
            with mailbox_lock(1) as again:
                assert not again
        assert not rerun_requested(2)
    assert rerun_requested(1)
    assert not rerun_requested(1)  # taken once: one rerun answers them all


def test_a_poll_that_gets_the_mailbox_leaves_no_rerun_request(redis_db: RedisDb) -> None:
    with mailbox_lock(1) as held:
        assert held
    assert not rerun_requested(1)
