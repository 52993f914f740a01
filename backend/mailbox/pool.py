"""Logged-in IMAP sessions kept between polls of the same mailbox, in this process.

An idle poll's largest costs are the TCP (and TLS) handshake and LOGIN: a session that
ended its poll cleanly is kept, and the next poll of the same mailbox in this process
uses it after a NOOP shows it still answers. It is safe to reuse because:
- at most IMAP_POOL_SIZE sessions are kept (the least recently used goes), each for at
  most IMAP_POOL_MAX_AGE_SECONDS from its login, and IMAP_POOL_SIZE=0 keeps none;
- a session is keyed by the account and a fingerprint of its server and credentials:
  new credentials or a new server never get the old login;
- a poll takes its session out of the pool, so no two threads ever use one at once;
- a session is closed, never kept, after any error, a broken connection or a passed
  deadline (`ImapSession.end_poll`).
Each worker process keeps its own: a mailbox may hold one kept connection per process,
which counts against the server's per-user connection limit.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from backend.config import get_settings
from backend.mailbox.imap import ImapError, ImapSession
from backend.models import Account

_guard = threading.Lock()
# account id -> (fingerprint, session), the least recently kept first.
_kept: OrderedDict[int, tuple[str, ImapSession]] = OrderedDict()


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
    """A logged-in session for one poll: a kept one that answers NOOP, or a new one from
    `open_session`. Kept afterwards when the poll ended cleanly (close it to prevent that)."""
    key = fingerprint(account)
    mailbox = _take(account.id, key) or open_session(account)
    try:
        yield mailbox
    except BaseException:
        mailbox.close()
        raise
    _keep(account.id, key, mailbox)


def _take(account_id: int, key: str) -> ImapSession | None:
    with _guard:
        kept = _kept.pop(account_id, None)
    if kept is None:
        return None
    kept_key, mailbox = kept
    if kept_key != key or _too_old(mailbox):
        mailbox.close()
        return None
    try:
        mailbox.noop()
    except ImapError:
        mailbox.close()
        return None
    return mailbox


def _keep(account_id: int, key: str, mailbox: ImapSession) -> None:
    size = get_settings().imap_pool_size
    if size == 0 or _too_old(mailbox) or not mailbox.end_poll():
        mailbox.close()
        return
    with _guard:
        dropped = [_kept.pop(account_id, None)]
        _kept[account_id] = (key, mailbox)
        while len(_kept) > size:
            dropped.append(_kept.popitem(last=False)[1])
    for old in dropped:
        if old is not None:
            old[1].close()


def _too_old(mailbox: ImapSession) -> bool:
    return time.monotonic() - mailbox.opened_at > get_settings().imap_pool_max_age_seconds


def clear() -> None:
    """Log out of every kept session (tests, and a process that stops polling)."""
    with _guard:
        kept = list(_kept.values())
        _kept.clear()
    for _key, mailbox in kept:
        mailbox.close()


def kept() -> int:
    """How many sessions are kept now."""
    with _guard:
        return len(_kept)
