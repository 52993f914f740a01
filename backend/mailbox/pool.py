"""Logged-in IMAP sessions kept between polls of the same mailbox, in this process.

An idle poll's largest costs are the TCP (and TLS) handshake and LOGIN: a session that
ended its poll cleanly is kept, and the next poll of the same mailbox in this process
uses it once a first command shows it still answers (`ImapSession.resume`). It is safe
to reuse because:
- at most IMAP_POOL_SIZE sessions are kept (the least recently used goes), each for at
  most IMAP_POOL_MAX_AGE_SECONDS from its login, and IMAP_POOL_SIZE=0 keeps none;
- a session is keyed by the account and a fingerprint of its server and credentials:
  new credentials or a new server never get the old login;
- a poll takes its session out of the pool, so no two threads ever use one at once;
- a session is closed, never kept, after any error, a broken connection or a passed
  deadline (`ImapSession.end_poll`).
Each worker process keeps its own: a mailbox may hold one kept connection per process.
A kept session holds its slot in the host's connection budget (backend/mailbox/budget.py)
until it is closed; when a claim anywhere waits for that host, the sessions kept on it
are closed (`budget.on_wanted`), so idle connections never keep a poll waiting.

A session a poll lets go (the least recently used one, or its own with IMAP_POOL_SIZE=0)
is logged out by a closing thread while the poll records itself, and the poll waits for it
before it returns (`settle`): Dovecot answers a LOGOUT only once it has closed the
session's folder, 2 ms a poll in a first sync of 100 mailboxes (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

from backend.config import get_settings
from backend.mailbox import budget
from backend.mailbox.imap import ImapError, ImapSession
from backend.models import Account

log = logging.getLogger(__name__)

_guard = threading.Lock()
# account id -> (fingerprint, host, session), the least recently kept first.
_kept: OrderedDict[int, tuple[str, str, ImapSession]] = OrderedDict()
# The logouts of sessions let go, by the thread whose poll let them go (`settle`).
_letting_go = threading.local()
_closer: tuple[int, ThreadPoolExecutor] | None = None
# Logouts at once: a server that never answers one (until the read timeout) holds up
# only the poll that let its session go, not those of other threads.
CLOSING_THREADS = 32


def fingerprint(account: Account) -> str:
    """What a kept login is only good for: the server and the credentials."""
    parts = (
        account.imap_host,
        str(account.imap_port),
        str(account.imap_security),
        account.username,
        str(account.auth_method),
        account.credentials_encrypted,
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@contextmanager
def session(
    account: Account, open_session: Callable[[Account], ImapSession]
) -> Iterator[ImapSession]:
    """A logged-in session for one poll: a kept one that still answers, or a new one from
    `open_session`. Kept afterwards when the poll ended cleanly (close it to prevent that)."""
    key = fingerprint(account)
    mailbox = _take(account.id, key) or open_session(account)
    try:
        yield mailbox
    except BaseException:
        mailbox.close()
        raise
    _keep(account.id, key, account.imap_host.lower(), mailbox)


def _take(account_id: int, key: str) -> ImapSession | None:
    with _guard:
        kept = _kept.pop(account_id, None)
    if kept is None:
        return None
    kept_key, _host, mailbox = kept
    if kept_key != key or _too_old(mailbox):
        mailbox.close()
        return None
    try:
        mailbox.resume()
    except ImapError:
        mailbox.close()
        return None
    return mailbox


def _keep(account_id: int, key: str, host: str, mailbox: ImapSession) -> None:
    size = get_settings().imap_pool_size
    if size == 0 or _too_old(mailbox) or not mailbox.end_poll():
        _let_go(mailbox)
        return
    with _guard:
        dropped = [_kept.pop(account_id, None)]
        _kept[account_id] = (key, host, mailbox)
        while len(_kept) > size:
            dropped.append(_kept.popitem(last=False)[1])
    for old in dropped:
        if old is not None:
            _let_go(old[2])


def _let_go(mailbox: ImapSession) -> None:
    """Log out in the closing thread (`settle` waits for it)."""
    global _closer  # noqa: PLW0603 - one set of closing threads per process
    with _guard:
        if _closer is None or _closer[0] != os.getpid():  # a forked child makes its own
            threads = ThreadPoolExecutor(CLOSING_THREADS, thread_name_prefix="imap-logout")
            _closer = (os.getpid(), threads)
        closing = _closer[1].submit(mailbox.close)
    pending: list[Future[None]] = getattr(_letting_go, "pending", [])
    _letting_go.pending = [*pending, closing]


def settle() -> None:
    """Wait until the sessions this thread's polls let go are logged out: their slots
    in the host's connection budget are free again."""
    pending: list[Future[None]] = getattr(_letting_go, "pending", [])
    _letting_go.pending = []
    for closed in wait(pending).done:
        # close() keeps the server's errors to itself; what could end here is one of
        # its callbacks' (the budget slot's release), which the poll used to raise.
        if (exc := closed.exception()) is not None:
            log.warning("a session let go was not closed cleanly: %s", type(exc).__name__)


def _too_old(mailbox: ImapSession) -> bool:
    return time.monotonic() - mailbox.opened_at > get_settings().imap_pool_max_age_seconds


def clear() -> None:
    """Log out of every kept session (tests, and a process that stops polling)."""
    with _guard:
        kept = list(_kept.values())
        _kept.clear()
    for _key, _host, mailbox in kept:
        mailbox.close()


def drop_host(host: str) -> None:
    """Log out of the sessions kept on `host`: a claim for a connection there waits."""
    with _guard:
        ids = [account_id for account_id, (_k, kept_host, _m) in _kept.items() if kept_host == host]
        dropped = [_kept.pop(account_id)[2] for account_id in ids]
    for mailbox in dropped:
        mailbox.close()


budget.on_wanted(drop_host)


def kept() -> int:
    """How many sessions are kept now."""
    with _guard:
        return len(_kept)
