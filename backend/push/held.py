"""Held checks: the watcher keeps a logged-in session for every mailbox polled at most
every HELD_INTERVAL_MAX_SECONDS (push off), asks its folders' STATUS on that session at
the mailbox's interval, and sends a poll only when the answer differs from what the
mailbox's last complete poll saw (UIDVALIDITY, UIDNEXT, and HIGHESTMODSEQ where changes
are tracked). A check that finds nothing new is the mailbox's idle poll without a
Celery task, a login, a PollRun row or a transaction of its own: it costs a STATUS
written and read on a socket the selector already waits on.

What a check records, and who else relies on it:
- Redis (schedules/store.record_checks, a pipeline per second for every check of that
  second): the mailbox's `checked` key, which tells beat to send it only its safety
  polls (HELD_SAFETY_INTERVAL_SECONDS); the key lapses two intervals after the last
  check, so a watcher that dies, loses the session or falls behind hands the mailbox
  back to beat's interval by itself. Letting a mailbox go deletes the key at once.
  The check counters feed /admin/capacity.
- The database (push/service.record_checks, one UPDATE per second at most): the
  account's last poll and last complete poll, at most every HELD_RECORD_SECONDS per
  mailbox, so freshness and the API's last-poll time stay true.

Which watcher holds which mailbox is decided by leases, as for push, under their own
prefix; the connections count against the same per-watcher caps as push's IDLE
connections (`within_budget`), and each holds a slot of its host's connection budget
(backend/mailbox/budget.py) as IDLE's do.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import queue
import random
import selectors
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

from backend import leases as fenced
from backend import redis
from backend.accounts import state
from backend.config import get_settings
from backend.mailbox import budget, folders, imap
from backend.mailbox.service import open_held
from backend.push import service
from backend.push.service import Baseline, Checked

log = logging.getLogger(__name__)

LEASE_PREFIX = "mailbeat:held:lease:"
FENCE_PREFIX = "mailbeat:held:fence:"
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 300.0


def reconnect_delay(failures: int, error: imap.ImapError | None, host: str) -> float:
    """Seconds before a watcher's connection (IDLE or held) is tried again: a jittered
    backoff; after a throttle answer, the server's wait as a poll's, not sooner, and a
    host throttled about its load or connections is marked as a poll marks it (one
    connection at a time; the watcher's other connections to it wait: open_held)."""
    ceiling = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (failures - 1))
    delay = random.uniform(RETRY_BASE_SECONDS / 2, ceiling)  # noqa: S311 - jitter
    if isinstance(error, imap.ImapThrottled):
        wait = state.throttle_delay(error).total_seconds()
        delay = max(delay, wait)
        if error.host_wide and host:
            budget.throttled(host, wait)
    return delay


# What the checks found is handed to the sending thread this often.
FLUSH_SECONDS = 1.0

# (kind, account_id, value) for the watcher's sending thread.
Outbox = Callable[[tuple[str, int, object]], None]


def within_budget(by_host: Mapping[str, int], total: int, host: str, more: int) -> bool:
    """Whether this watcher may claim `more` mailboxes on `host`, holding `total`
    connections in all and `by_host` per host (push's IDLE connections and held sessions
    together). The host's connection budget shared by every process
    (backend/mailbox/budget.py) is asked again as each session opens."""
    settings = get_settings()
    return (
        total + more <= settings.watcher_max_connections
        and by_host.get(host, 0) + more <= settings.watcher_max_per_host
    )


@dataclass(eq=False)
class HeldSession:
    """One held mailbox: its session, or when to try again, and when to check next."""

    checked: Checked
    lease: str
    link: imap.StatusLink | None = None
    opening: bool = False
    failures: int = 0
    retry_at: float = 0.0
    next_check: float = 0.0
    baseline: Baseline | None = None
    reloading: bool = False
    recorded_at: float = 0.0  # monotonic: when a check was last written to the account


@dataclass(frozen=True)
class Opened:
    session: HeldSession
    link: imap.StatusLink | None
    baseline: Baseline | None = None
    error: imap.ImapError | None = None


@dataclass(frozen=True)
class Reloaded:
    """The baseline read again after a check differed from the one kept."""

    session: HeldSession
    baseline: Baseline
    statuses: dict[str, imap.FolderStatus]


@dataclass
class Found:
    """What the checks of one flush found, for the sending thread."""

    unchanged: dict[int, float] = field(default_factory=dict)  # mailbox: its interval
    record: list[int] = field(default_factory=list)  # mailboxes to write to the database


class HeldChecks:
    """The watcher's held sessions; driven from its selector thread (`turn`, `tick`,
    `readable`, `shutdown`), logins on its pool, writes through its sending thread."""

    def __init__(
        self,
        name: str,
        selector: selectors.BaseSelector,
        logins: Executor,
        wake: Callable[[], None],
        send: Outbox,
    ) -> None:
        self.settings = get_settings()
        self.leases = fenced.Leases(
            name,
            self.settings.watcher_lease_seconds,
            lease_prefix=LEASE_PREFIX,
            fence_prefix=FENCE_PREFIX,
        )
        self.selector = selector
        self._logins = logins
        self._wake = wake
        self._send = send
        self.sessions: dict[int, HeldSession] = {}
        self._done: queue.SimpleQueue[Opened | Reloaded] = queue.SimpleQueue()
        self._due: list[tuple[float, int]] = []  # (next check, mailbox), a heap
        self._found = Found()
        self._next_flush = 0.0
        self._next_timeouts = 0.0

    # -- leases --------------------------------------------------------------------------

    def turn(self, watchers: int, push_by_host: Mapping[str, int]) -> None:
        """Every third of the lease: renew, let go of what is no longer wanted, claim up
        to the share within the budget left by push, open what is due."""
        try:
            lost = self.leases.renew({i: s.lease for i, s in self.sessions.items()})
            for account_id in lost:
                log.warning("mailbox %s: held lease lost to another watcher", account_id)
                self._let_go(account_id, release=False)
            self._rebalance(service.held_accounts(), watchers, push_by_host)
        except (redis.RedisError, OSError) as exc:
            log.warning("watcher: cannot renew or claim held sessions (%s); trying again", exc)
        except Exception:
            log.exception("watcher: held sessions' turn failed; trying again")
        self._open_due()

    def _rebalance(
        self, wanted: dict[int, Checked], watchers: int, push_by_host: Mapping[str, int]
    ) -> None:
        for account_id, held in list(self.sessions.items()):
            if wanted.get(account_id) != held.checked:  # interval, server or login changed
                self._let_go(account_id)
        share = math.ceil(len(wanted) / watchers)
        for account_id in list(self.sessions)[share:]:  # a watcher joined: give some back
            self._let_go(account_id)
        by_host = Counter(push_by_host)
        for held in self.sessions.values():
            by_host[held.checked.host] += 1
        total = sum(by_host.values())
        free = [i for i in wanted if i not in self.sessions]
        random.shuffle(free)  # watchers starting together try different mailboxes first
        claim: list[int] = []
        for account_id in free[: max(0, share - len(self.sessions))]:
            host = wanted[account_id].host
            if not within_budget(by_host, total, host, 1):
                continue
            claim.append(account_id)
            by_host[host] += 1
            total += 1
        for account_id, lease in self.leases.claim(claim).items():
            self.sessions[account_id] = HeldSession(wanted[account_id], lease)
        if claim:
            log.info("watcher: holds %d sessions for checks", len(self.sessions))

    def _let_go(self, account_id: int, *, release: bool = True) -> None:
        held = self.sessions.pop(account_id, None)
        if held is None:
            return
        self._drop_link(held, polite=True)
        self._forget(account_id)
        if release:
            with contextlib.suppress(redis.RedisError):
                self.leases.release(account_id, held.lease)

    # -- sessions --------------------------------------------------------------------------

    def _open_due(self) -> None:
        now = time.monotonic()
        for held in self.sessions.values():
            if held.link is None and not held.opening and held.retry_at <= now:
                held.opening = True
                self._logins.submit(self._open, held)

    def _open(self, held: HeldSession) -> None:
        """On a login thread: log in, find the folders, read the baseline."""
        session: imap.ImapSession | None = None
        try:
            account = service.load_account(held.checked.account_id)
            if account is None:
                raise imap.ImapProtocolError("the account is gone")
            session = open_held(account, "held")
            settings = self.settings
            session.arm_deadline(settings.imap_connect_timeout + settings.imap_read_timeout)
            names = folders.for_account(account.id, account.folders, session)
            baseline = service.load_baseline(account.id)
            self._done.put(Opened(held, session.status_link(names), baseline))
        except imap.ImapError as exc:
            if session is not None:
                session.close()
            self._done.put(Opened(held, None, error=exc))
        except Exception as exc:
            log.exception("mailbox %s: opening a held session failed", held.checked.account_id)
            if session is not None:
                session.close()
            self._done.put(Opened(held, None, error=imap.ImapError(str(exc)[:300])))
        self._wake()

    def _reload(self, held: HeldSession, statuses: dict[str, imap.FolderStatus]) -> None:
        try:
            self._done.put(Reloaded(held, service.load_baseline(held.checked.account_id), statuses))
        except Exception:
            log.exception("mailbox %s: reading its baseline failed", held.checked.account_id)
            held.reloading = False
        self._wake()

    def _take_done(self, now: float) -> None:
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            held = done.session
            current = self.sessions.get(held.checked.account_id) is held
            if isinstance(done, Reloaded):
                held.reloading = False
                if current:
                    held.baseline = done.baseline
                    self._judge(held, done.statuses, now, reloaded=True)
                continue
            held.opening = False
            if not current:
                if done.link is not None:  # let go of while it logged in
                    done.link.end()
                    done.link.close()
                continue
            if done.link is None:
                self._failed(held, done.error)
                continue
            held.link, held.baseline = done.link, done.baseline
            self.selector.register(done.link, selectors.EVENT_READ, held)
            # The first check at a random point of the interval: a thousand sessions
            # opened together do not check together ever after.
            held.next_check = now + random.uniform(0, held.checked.interval)  # noqa: S311
            heapq.heappush(self._due, (held.next_check, held.checked.account_id))

    # -- checking ----------------------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Send the checks that are due, hand on what was found; returns the seconds
        until the next check is due."""
        self._take_done(now)
        while self._due and self._due[0][0] <= now:
            at, account_id = heapq.heappop(self._due)
            held = self.sessions.get(account_id)
            if held is None or held.link is None or held.next_check != at:
                continue  # let go of, or reopened since (its own entry is in the heap)
            interval = held.checked.interval
            # In phase with its first check; one missed (the thread was busy) is not made up.
            held.next_check = at + interval * max(1, math.ceil((now - at) / interval))
            heapq.heappush(self._due, (held.next_check, account_id))
            if held.link.busy:
                continue  # the last check is still unanswered: the timeout decides
            try:
                held.link.ask()
            except imap.ImapError as exc:
                self._failed(held, exc)
        if now >= self._next_timeouts:
            self._check_timeouts(now)
            self._next_timeouts = now + 1.0
        if now >= self._next_flush:
            self.flush()
            self._next_flush = now + FLUSH_SECONDS
        return self._due[0][0] - now if self._due else FLUSH_SECONDS

    def readable(self, held: HeldSession) -> None:
        link = held.link
        if link is None:
            return
        try:
            statuses = link.read()
        except imap.ImapError as exc:
            self._failed(held, exc)
            return
        if statuses is not None:
            self._judge(held, statuses, time.monotonic())

    def _judge(
        self,
        held: HeldSession,
        statuses: dict[str, imap.FolderStatus],
        now: float,
        *,
        reloaded: bool = False,
    ) -> None:
        """Nothing new: a check to record. Else the kept baseline is read again first (a
        poll may have moved it since), and a poll is sent if it still differs."""
        account_id = held.checked.account_id
        if held.baseline is not None and held.baseline.unchanged(statuses):
            self._found.unchanged[account_id] = held.checked.interval
            if now - held.recorded_at >= self.settings.held_record_seconds:
                self._found.record.append(account_id)
                held.recorded_at = now
        elif reloaded:
            self._send(("change", account_id, None))
        elif not held.reloading:
            held.reloading = True
            self._logins.submit(self._reload, held, statuses)

    def flush(self) -> None:
        if self._found.unchanged:
            found, self._found = self._found, Found()
            self._send(("checks", 0, found))

    def _check_timeouts(self, now: float) -> None:
        timeout = self.settings.imap_read_timeout
        for held in list(self.sessions.values()):
            link = held.link
            waiting = None if link is None else link.waiting_since
            if waiting is not None and now - waiting > timeout:
                self._failed(held, imap.ImapConnectionError(f"no answer within {timeout}s"))

    def _failed(self, held: HeldSession, error: imap.ImapError | None) -> None:
        self._drop_link(held, polite=False)
        held.baseline = None
        held.failures += 1
        delay = reconnect_delay(held.failures, error, held.checked.host)
        held.retry_at = time.monotonic() + delay
        self._forget(held.checked.account_id)
        log.warning(
            "mailbox %s: held session failed (%s); again in %.1fs",
            held.checked.account_id,
            error,
            delay,
        )

    def _forget(self, account_id: int) -> None:
        """Beat's interval applies again from the mailbox's next run: nobody checks it."""
        self._found.unchanged.pop(account_id, None)
        self._send(("forget", account_id, None))

    def _drop_link(self, held: HeldSession, *, polite: bool) -> None:
        link, held.link = held.link, None
        if link is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(link)
        if polite:
            link.end()
        link.close()

    def connections_by_host(self) -> Counter[str]:
        return Counter(h.checked.host for h in self.sessions.values() if h.link is not None)

    def shutdown(self) -> None:
        """LOGOUT on every session (not waited for), leases released, beat told."""
        self.flush()
        for account_id in list(self.sessions):
            self._let_go(account_id)
