"""The watcher (`python -m backend.cli watch`): IDLE connections for mailboxes with push
on, and a poll at the top priority as soon as a server reports news.

One thread waits on every connection at once (`selectors`); an IMAP connection in IDLE
costs a socket and a few kilobytes, not a thread. Logins (connect, TLS, AUTHENTICATE,
EXAMINE) block, so they run on a small pool (WATCHER_LOGIN_THREADS) and hand the
connection over once IDLE can start. Sending polls and writing statuses, which talk to
Redis and the database, run on one more thread, so a slow Redis never holds up reading.

Which watcher holds which mailbox is decided by leases (backend/push/leases.py): each
watcher claims free mailboxes up to its share (the connections of all pushed mailboxes
over the live watchers, at most WATCHER_MAX_CONNECTIONS, at most WATCHER_MAX_PER_HOST
to one IMAP host), renews what it holds, and gives back what exceeds its share when a
watcher joins. A dead watcher's leases run out and the others take its mailboxes.

A connection that fails is opened again after a backoff with full jitter (1 s doubling
to 5 min), or after the server's wait when it throttled (the host then marked for
every process, budget.throttled, and no watcher connects to it before the wait is
over); each time IDLE is (re)established a poll is sent, so news from while nobody
watched is not left to the interval. IDLE is ended and issued again every
WATCHER_IDLE_SECONDS (servers drop it after 29 minutes). A folder deleted, recreated or
renumbered under a link is selected again at once (_reselect), and a login changed
through the API is used at once (_new_logins). On SIGTERM or SIGINT every
connection gets DONE and LOGOUT, and the leases are released for the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import random
import selectors
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType

from backend import dispatch, metrics, redis
from backend.config import get_settings
from backend.mailbox import folders, imap
from backend.mailbox.service import open_held
from backend.models import PushStatus
from backend.push import service
from backend.push.held import Found, HeldChecks, HeldSession, reconnect_delay
from backend.push.leases import Leases, watcher_name
from backend.push.service import Pushed
from backend.schedules import service as schedules
from backend.schedules import store

log = logging.getLogger(__name__)

# How long DONE LOGOUT may take, for all connections together, at shutdown.
LOGOUT_SECONDS = 5.0


@dataclass
class Watch:
    """One folder of a held mailbox: its connection, or when to try again."""

    account_id: int
    folder: str
    link: imap.IdleLink | None = None
    opening: bool = False
    failures: int = 0
    retry_at: float = 0.0
    renew_at: float = 0.0
    # Set once a connection failed: the next IDLE established sends a poll.
    lost: bool = False
    # The UIDVALIDITY a poll found that this watch selected again for (_renumbered).
    reselected_for: int | None = None


@dataclass
class Held:
    pushed: Pushed
    lease: str
    watches: dict[str, Watch] = field(default_factory=dict)


@dataclass(frozen=True)
class Opened:
    """What a login thread hands back: a link, the server lacks IDLE, or the error."""

    watch: Watch
    link: imap.IdleLink | None
    unsupported: bool = False
    error: imap.ImapError | None = None


class Watcher:
    def __init__(self) -> None:
        settings = get_settings()
        self.settings = settings
        self.name = watcher_name(os.getpid(), uuid.uuid4().hex[:6])
        self.leases = Leases(self.name, settings.watcher_lease_seconds)
        self.selector = selectors.DefaultSelector()
        self.held: dict[int, Held] = {}
        self.pushed: dict[int, Pushed] = {}
        self.stopping = threading.Event()
        self._opened: queue.SimpleQueue[Opened] = queue.SimpleQueue()
        # Wakes the selector when a login finishes or a stop is asked for.
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._logins = ThreadPoolExecutor(
            settings.watcher_login_threads, thread_name_prefix="watch-login"
        )
        self._outbox: queue.SimpleQueue[tuple[str, int, object] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="watch-send", daemon=True)
        self._hosts_seen: set[str] = set()
        self._next_confirm = 0.0
        self.checks = HeldChecks(
            self.name, self.selector, self._logins, self._wake, self._outbox.put
        )

    # -- running -------------------------------------------------------------------------

    def run(self) -> None:
        log.info("watcher %s starting", self.name)
        self._sender.start()
        lease_turn = self.leases.seconds / 3
        next_turn = next_check = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_turn:
                    self._turn()
                    next_turn = now + lease_turn
                self._take_opened()
                if now >= next_check:  # a walk over every link: once a second is enough
                    self._check_links(now)
                    next_check = now + 1.0
                next_held = self.checks.tick(now)
                timeout = max(0.0, min(next_turn - time.monotonic(), 1.0, next_held))
                for key, _events in self.selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_read.recv(4096)
                    elif isinstance(key.data, HeldSession):
                        self.checks.readable(key.data)
                    else:
                        self._readable(key.data)
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stopping.set()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    # -- leases: renew, give back, claim ---------------------------------------------------

    def _turn(self) -> None:
        """Every third of the lease: renew, then bring what is held in line with the
        share (give back the excess, claim up to it), then open what is due."""
        try:
            lost = self.leases.renew({i: h.lease for i, h in self.held.items()})
            for account_id in lost:
                log.warning("mailbox %s: lease lost to another watcher; letting go", account_id)
                self._let_go(account_id, release=False)
            watchers = self.leases.heartbeat()
            self.pushed = service.pushed_accounts()
            self._new_logins()
            self._rebalance(watchers)
            self._renumbered()
        except (redis.RedisError, OSError) as exc:
            log.warning("watcher: cannot renew or claim leases (%s); trying again", exc)
            watchers = 0
        except Exception:
            log.exception("watcher: lease turn failed; trying again")
            watchers = 0
        if watchers:
            self.checks.turn(watchers, self._push_by_host())
        self._open_due()
        self._report()
        self._confirm()

    def _share(self, watchers: int) -> int:
        total = sum(p.connections for p in self.pushed.values())
        return min(self.settings.watcher_max_connections, math.ceil(total / watchers))

    def _rebalance(self, watchers: int) -> None:
        # Mailboxes no longer pushed (push off, disabled, deleted) or changed: let go.
        for account_id, held in list(self.held.items()):
            if self.pushed.get(account_id) != held.pushed:
                self._let_go(account_id)
        share = self._share(watchers)
        connections = sum(h.pushed.connections for h in self.held.values())
        by_host = Counter[str]()
        for held in self.held.values():
            by_host[held.pushed.host] += held.pushed.connections
        # More than the share (a watcher joined): give some back for the others to take.
        for account_id in list(self.held):
            if connections <= share:
                break
            pushed = self.held[account_id].pushed
            self._let_go(account_id)
            connections -= pushed.connections
            by_host[pushed.host] -= pushed.connections
        free = [i for i in self.pushed if i not in self.held]
        random.shuffle(free)  # watchers starting together try different mailboxes first
        wanted: list[int] = []
        for account_id in free:
            pushed = self.pushed[account_id]
            if connections + pushed.connections > share:
                continue
            if by_host[pushed.host] + pushed.connections > self.settings.watcher_max_per_host:
                continue
            wanted.append(account_id)
            connections += pushed.connections
            by_host[pushed.host] += pushed.connections
        for account_id, lease in self.leases.claim(wanted).items():
            pushed = self.pushed[account_id]
            self.held[account_id] = Held(
                pushed, lease, {folder: Watch(account_id, folder) for folder in pushed.folders}
            )
        if wanted:
            log.info(
                "watcher %s: holds %d mailboxes (share %d connections, %d watchers)",
                self.name,
                len(self.held),
                share,
                watchers,
            )

    def _let_go(self, account_id: int, *, release: bool = True) -> None:
        held = self.held.pop(account_id, None)
        if held is None:
            return
        for watch in held.watches.values():
            self._drop_link(watch, polite=True)
        if release:
            with contextlib.suppress(redis.RedisError):
                self.leases.release(account_id, held.lease)

    # -- connections -------------------------------------------------------------------------

    def _open_due(self) -> None:
        now = time.monotonic()
        for held in self.held.values():
            for watch in held.watches.values():
                if watch.link is None and not watch.opening and watch.retry_at <= now:
                    watch.opening = True
                    self._logins.submit(self._open, watch)

    def _open(self, watch: Watch) -> None:
        """On a login thread: connect, log in, examine the folder, start IDLE."""
        session: imap.ImapSession | None = None
        try:
            account = service.load_account(watch.account_id)
            if account is None:
                raise imap.ImapProtocolError("the account is gone")
            session = open_held(account, "watch")
            settings = self.settings
            session.arm_deadline(settings.imap_connect_timeout + settings.imap_read_timeout)
            if not session.supports_idle():
                session.close()
                self._opened.put(Opened(watch, None, unsupported=True))
            else:
                folder = folders.one(watch.folder, session)
                if folder is None:
                    raise imap.ImapProtocolError(f"the server has no {watch.folder} folder")
                self._opened.put(Opened(watch, session.idle(session.select(folder))))
        except imap.ImapError as exc:
            if session is not None:
                session.close()
            self._opened.put(Opened(watch, None, error=exc))
        except Exception as exc:
            log.exception("mailbox %s: opening %r failed", watch.account_id, watch.folder)
            if session is not None:
                session.close()
            self._opened.put(Opened(watch, None, error=imap.ImapError(str(exc)[:300])))
        self._wake()

    def _take_opened(self) -> None:
        while True:
            try:
                opened = self._opened.get_nowait()
            except queue.Empty:
                return
            watch = opened.watch
            watch.opening = False
            held = self.held.get(watch.account_id)
            if held is None or held.watches.get(watch.folder) is not watch:
                if opened.link is not None:  # let go of while it logged in
                    opened.link.end()
                    opened.link.close()
                continue
            if opened.unsupported:
                log.warning(
                    "mailbox %s: the server offers no IDLE; polling it on its interval only",
                    watch.account_id,
                )
                self._outbox.put(("status", watch.account_id, PushStatus.UNSUPPORTED))
                self._let_go(watch.account_id)
                continue
            if opened.link is None:
                self._failed(watch, opened.error)
                # Connecting failed, not just a link that dropped: the mailbox is not
                # watched until it works again, and says so.
                self._outbox.put(("status", watch.account_id, PushStatus.FAILING))
                continue
            watch.link = opened.link
            self.selector.register(opened.link, selectors.EVENT_READ, watch)

    def _readable(self, watch: Watch) -> None:
        link = watch.link
        if link is None:
            return
        was = link.state
        try:
            changed = link.read()
        except imap.ImapError as exc:
            self._failed(watch, exc)
            return
        if was != "idling" and link.state == "idling":
            self._idling(watch)
        if changed:
            self._poll(watch.account_id)
        if link.reselect is not None:
            self._reselect(watch, link.reselect)

    def _idling(self, watch: Watch) -> None:
        """IDLE established (first time, again after a failure, or renewed): after a
        login, poll for what came meanwhile."""
        first = watch.renew_at == 0.0 and not watch.lost
        watch.renew_at = time.monotonic() + self.settings.watcher_idle_seconds
        if not (watch.failures or watch.lost or first):
            log.debug("mailbox %s: IDLE on %r renewed", watch.account_id, watch.folder)
        else:
            if watch.failures or watch.lost:
                log.info("mailbox %s: %r watched again", watch.account_id, watch.folder)
            held = self.held.get(watch.account_id)
            others = [] if held is None else [w for w in held.watches.values() if w is not watch]
            if not any(w.failures for w in others):  # else it stays "failing"
                self._outbox.put(("status", watch.account_id, PushStatus.WATCHING))
            if watch.link is not None and (watch.failures or watch.lost):
                self._outbox.put(("selected", watch.account_id, watch.link.folder))
            self._poll(watch.account_id)
        watch.failures = 0
        watch.lost = False

    def _check_links(self, now: float) -> None:
        """Renew IDLE when due; give up on a server that does not answer."""
        timeout = self.settings.imap_read_timeout
        for held in self.held.values():
            for watch in held.watches.values():
                link = watch.link
                if link is None:
                    continue
                if link.waiting_since is not None and now - link.waiting_since > timeout:
                    self._failed(watch, imap.ImapConnectionError(f"no answer within {timeout}s"))
                elif link.state == "idling" and now >= watch.renew_at:
                    try:
                        link.renew()
                    except imap.ImapError as exc:
                        self._failed(watch, exc)
                    watch.renew_at = now + self.settings.watcher_idle_seconds

    def _failed(self, watch: Watch, error: imap.ImapError | None) -> None:
        self._drop_link(watch, polite=False)
        watch.lost = True
        watch.failures += 1
        held = self.held.get(watch.account_id)
        host = held.pushed.host if held is not None else ""
        delay = reconnect_delay(watch.failures, error, host)
        watch.retry_at = time.monotonic() + delay
        log.warning(
            "mailbox %s: watching %r failed (%s); again in %.1fs",
            watch.account_id,
            watch.folder,
            error,
            delay,
        )

    # -- a folder gone, recreated or renumbered; a new login ----------------------------------

    def _reselect(self, watch: Watch, why: str) -> None:
        """The folder selected is not the folder any more (deleted, recreated,
        renumbered) and the server kept the link: connect and select it again at once,
        not counted as a failure. A folder that is gone for good fails to open and is
        retried on its own, with its backoff."""
        log.info("mailbox %s: selecting %r again: %s", watch.account_id, watch.folder, why)
        self._drop_link(watch, polite=True)
        watch.lost = True
        watch.retry_at = 0.0
        watch.opening = True
        self._logins.submit(self._open, watch)

    def _renumbered(self) -> None:
        """A poll found a watched folder under another UIDVALIDITY than the one its link
        selected (a server that told the link nothing): select it again, once per
        UIDVALIDITY found, so a link ahead of the poll is not selected over and over."""
        links = {
            (account_id, watch.link.folder): watch
            for account_id, held in self.held.items()
            for watch in held.watches.values()
            if watch.link is not None
        }
        if not links:
            return
        for key, uidvalidity in service.folder_generations(list(self.held)).items():
            watch = links.get(key)
            if watch is None or watch.link is None:
                continue
            if uidvalidity not in (watch.link.uidvalidity, watch.reselected_for):
                watch.reselected_for = uidvalidity
                self._reselect(watch, f"a poll found UIDVALIDITY {uidvalidity}")

    def _new_logins(self) -> None:
        """Mailboxes whose login changed through the API (password, token, server,
        username): drop IDLE on the old one and connect each folder again now, keeping
        the lease; push_status is written again as IDLE is established."""
        for account_id, held in self.held.items():
            pushed = self.pushed.get(account_id)
            if pushed is None or pushed.login_changed_at == held.pushed.login_changed_at:
                continue
            if (pushed.host, pushed.folders) != (held.pushed.host, held.pushed.folders):
                continue  # another mailbox in effect: _rebalance lets it go
            log.info("mailbox %s: new login; connecting again", account_id)
            for watch in held.watches.values():
                self._drop_link(watch, polite=True)
            # New watches: a login still under way with the old one is dropped as it
            # comes back (_take_opened), and the first IDLE writes push_status.
            held.watches = {folder: Watch(account_id, folder) for folder in pushed.folders}
            held.pushed = pushed

    def _drop_link(self, watch: Watch, *, polite: bool) -> None:
        link, watch.link = watch.link, None
        if link is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(link)
        if polite:
            link.end()
        link.close()

    def _poll(self, account_id: int) -> None:
        self._outbox.put(("poll", account_id, time.time()))

    # -- the sending thread ------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            kind, account_id, value = item
            try:
                if kind == "poll":
                    assert isinstance(value, float)
                    if schedules.enqueue_news_poll(account_id, value):
                        metrics.record_push_poll()
                elif kind == "change":  # a held check found something new
                    schedules.enqueue_news_poll(account_id)
                    metrics.record_held_checks(0, changed=1)
                elif kind == "checks":
                    assert isinstance(value, Found)
                    store.record_checks(value.unchanged, time.time())
                    service.record_checks(value.record)
                    metrics.record_held_checks(len(value.unchanged))
                elif kind == "forget":
                    store.forget_check(account_id)
                elif kind == "confirm":
                    assert isinstance(value, list)
                    service.confirm_watching(value)
                elif kind == "selected":
                    assert isinstance(value, str)
                    service.folder_selected(account_id, value)
                else:
                    assert isinstance(value, PushStatus)
                    service.save_statuses({account_id: value})
            except Exception:
                # The interval's poll is the safety net; the next news sends another.
                log.exception("mailbox %s: sending the %s failed", account_id, kind)

    def _confirm(self) -> None:
        """Once a lease: the mailboxes watched on every folder are still watched (their
        push_status would turn stale without it)."""
        now = time.monotonic()
        if now < self._next_confirm:
            return
        self._next_confirm = now + self.leases.seconds
        watched = [
            account_id
            for account_id, held in self.held.items()
            if held.watches and all(w.link is not None for w in held.watches.values())
        ]
        self._outbox.put(("confirm", 0, watched))

    def _push_by_host(self) -> Counter[str]:
        by_host = Counter[str]()
        for held in self.held.values():
            by_host[held.pushed.host] += held.pushed.connections
        return by_host

    def _report(self) -> None:
        by_host = Counter[str]()
        for held in self.held.values():
            for watch in held.watches.values():
                if watch.link is not None:
                    by_host[held.pushed.host] += 1
        self._hosts_seen.update(by_host)
        metrics.set_push_connections({host: by_host[host] for host in self._hosts_seen})

    # -- stopping ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("watcher %s stopping: DONE and LOGOUT on every connection", self.name)
        self._logins.shutdown(wait=False, cancel_futures=True)
        self.checks.shutdown()
        links = []
        for held in self.held.values():
            for watch in held.watches.values():
                if watch.link is not None:
                    watch.link.end()
                    links.append(watch.link)
        deadline = time.monotonic() + LOGOUT_SECONDS
        while any(link.state != "closed" for link in links) and time.monotonic() < deadline:
            for key, _events in self.selector.select(0.2):
                watch = key.data
                if watch is None or watch.link is None:
                    continue
                try:
                    watch.link.read()
                except imap.ImapError:
                    self.selector.unregister(watch.link)
                    watch.link.close()
        for link in links:
            link.close()
        for account_id, held in self.held.items():
            with contextlib.suppress(redis.RedisError):
                self.leases.release(account_id, held.lease)
        self.held.clear()
        with contextlib.suppress(redis.RedisError):
            self.leases.leave()
        self._report()
        self._outbox.put(None)
        self._sender.join(timeout=10)
        self.selector.close()
        log.info("watcher %s stopped", self.name)


def watch() -> None:
    """`cli watch`: run a watcher until SIGTERM or SIGINT."""
    dispatch.assume_celery_mode()  # leases and polls go through Redis: no local mode
    watcher = Watcher()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        watcher.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watcher.run()
