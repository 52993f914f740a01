from __future__ import annotations

import threading
import time

from backend.config import get_settings
from backend.leases import token
from backend.mailbox.lock import (
    MailboxLock,
    held,
    lock_key,
    mailbox_lock,
    rerun_key,
    rerun_requested,
)
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for


def test_one_holder_at_a_time(redis_db: RedisDb) -> None:
    first, second = MailboxLock(1), MailboxLock(1)
    assert first.acquire()
    assert not second.acquire()
    assert MailboxLock(2).acquire()  # another mailbox is independent
    assert first.release()
    assert second.acquire()


def test_the_lease_is_short_and_fenced(redis_db: RedisDb) -> None:
    first = MailboxLock(1)
    assert first.acquire()
    ttl = redis_db.client().pttl(lock_key(1))
    assert 0 < ttl <= get_settings().mailbox_lease_seconds * 1000
    assert get_settings().mailbox_lease_seconds < get_settings().poll_time_limit_seconds
    assert redis_db.client().get(lock_key(1)) == (first.value or "").encode()
    assert first.release()
    second = MailboxLock(1)
    assert second.acquire()
    assert second.value is not None and first.value is not None
    assert token(second.value) == token(first.value) + 1  # every acquisition a new token
    assert second.release()


def test_a_live_holder_keeps_the_mailbox_past_its_lease(redis_db: RedisDb) -> None:
    # Leases of 3 s renewed every second: a renewal may come 2 s late on a loaded machine.
    holder = MailboxLock(1, seconds=3)
    assert holder.acquire()
    time.sleep(7.5)  # two and a half leases: only the heartbeat's renewals keep it
    assert redis_db.client().exists(lock_key(1))
    assert not MailboxLock(1).acquire()
    assert not holder.lost.is_set()
    assert holder.release()


def test_a_dead_holder_frees_the_mailbox_within_its_lease(redis_db: RedisDb) -> None:
    dead = MailboxLock(1, seconds=1)
    assert dead.acquire()
    dead._stop.set()  # its process died: no more renewals, no release
    wait_for(lambda: not redis_db.client().exists(lock_key(1)), "the lease to run out")
    assert MailboxLock(1).acquire()


def test_a_stale_holder_learns_it_lost_and_cannot_release(redis_db: RedisDb) -> None:
    stale = MailboxLock(1, seconds=1)
    assert stale.acquire()
    redis_db.client().delete(lock_key(1))  # as if it had expired while it stalled
    current = MailboxLock(1)
    assert current.acquire()
    wait_for(stale.lost.is_set, "the stale holder's heartbeat to find the lease lost")
    assert not stale.release()  # must not delete the lock the current poll holds
    assert redis_db.client().get(lock_key(1)) == (current.value or "").encode()
    assert current.release()
    assert not redis_db.client().exists(lock_key(1))


def test_a_rerun_request_lives_as_long_as_its_holder(redis_db: RedisDb) -> None:
    holder = MailboxLock(1, seconds=3)
    assert holder.acquire()
    redis_db.client().set(rerun_key(1), 1, px=3000)  # as a refused poll leaves it
    time.sleep(7.5)
    assert redis_db.client().exists(rerun_key(1))  # renewed with the lease
    holder._stop.set()
    holder._heartbeat.join()  # type: ignore[union-attr]
    wait_for(lambda: not redis_db.client().exists(rerun_key(1)), "the request to go")


def test_held_tells_live_polls(redis_db: RedisDb) -> None:
    holder = MailboxLock(3)
    assert holder.acquire()
    assert held([1, 3, 5]) == {3}
    assert holder.release()
    assert held([3]) == set()


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
