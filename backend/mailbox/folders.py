"""Which folders an account's `folders` mean on its server.

An entry is a folder name as the server spells it (`INBOX`, `Sent Items`, `INBOX.Archive`,
`已发送`), an RFC 6154 special use (`\\Sent`, `\\All`, `\\Junk`, ...: the same account
works on every provider and in every language), or `*`: every selectable folder but the
junk and trash ones (name those to have them too). Names need no LIST; a special use or
`*` is looked up in the server's LIST, kept per process for FOLDER_LIST_SECONDS, so a
folder created later is polled within that time and one deleted is no longer asked for
(its messages stay stored).

Gmail (X-GM-EXT-1) shows one message in every label's folder and in `[Gmail]/All Mail`
(`\\All`): when All Mail is among the folders meant, it alone is polled, with Spam and
Trash (which All Mail leaves out) when they are meant too; a message's labels come with
it (X-GM-LABELS), so the label folders are not polled on their own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from backend.config import get_settings

EVERY = "*"
INBOX = "INBOX"
# RFC 6154's uses, and \Inbox for the one folder every server has (RFC 3501).
SPECIAL_USES = (
    "\\Inbox",
    "\\All",
    "\\Archive",
    "\\Drafts",
    "\\Flagged",
    "\\Junk",
    "\\Sent",
    "\\Trash",
)
_BY_LOWER = {use.lower(): use for use in SPECIAL_USES}
# Left out of `*` unless named: nobody wants their spam handed on.
_NOT_IN_EVERY = ("\\Junk", "\\Trash")
_UNSELECTABLE = ("\\noselect", "\\nonexistent")


@dataclass(frozen=True)
class Listed:
    """A folder in the server's LIST: its name and its attributes, lower-cased."""

    name: str
    attributes: frozenset[str]


class Lister(Protocol):
    def list_folders(self) -> list[Listed]: ...


class Server(Lister, Protocol):
    @property
    def gmail(self) -> bool: ...


def special_use(entry: str) -> str | None:
    """The special use an entry names (`\\sent` -> `\\Sent`), or None for a folder name."""
    return _BY_LOWER.get(entry.lower()) if entry.startswith("\\") else None


def is_pattern(entry: str) -> bool:
    return entry == EVERY or special_use(entry) is not None


def invalid_entry(entry: str) -> str | None:
    """Why an entry can be neither a name nor a pattern, or None."""
    if entry.startswith("\\") and special_use(entry) is None:
        return f"{entry!r} is no special use; use one of {', '.join(SPECIAL_USES)} or a name"
    return None


def resolve(wanted: Sequence[str], listing: Iterable[Listed], *, gmail: bool = False) -> list[str]:
    """The folder names `wanted` means in this LIST, in the order asked, each once. A
    special use the server has no folder for means none. `gmail`: the server has Gmail's
    labels, and All Mail stands for every folder but Spam and Trash."""
    listed = [item for item in listing if not item.attributes & set(_UNSELECTABLE)]
    named = {special_use(entry) or entry for entry in wanted}
    found: list[str] = []
    for entry in wanted:
        use = special_use(entry)
        if entry == EVERY:
            skipped = [use.lower() for use in _NOT_IN_EVERY if use not in named]
            found += [item.name for item in listed if not item.attributes & set(skipped)]
        elif use == "\\Inbox":
            found.append(INBOX)
        elif use is not None:
            found += [item.name for item in listed if use.lower() in item.attributes]
        else:
            found.append(entry)
    found = list(dict.fromkeys(found))
    return _all_mail_once(found, listed) if gmail else found


def _all_mail_once(found: list[str], listed: Sequence[Listed]) -> list[str]:
    """On Gmail, with All Mail among `found`: All Mail, and Spam and Trash if found (All
    Mail leaves them out); the label folders (INBOX among them) hold nothing more."""
    attributes = {item.name: item.attributes for item in listed}
    if not any("\\all" in attributes.get(name, frozenset()) for name in found):
        return found
    kept = {"\\all", "\\junk", "\\trash"}
    return [name for name in found if attributes.get(name, frozenset()) & kept]


def watched(wanted: Sequence[str] | None) -> tuple[str, ...]:
    """What push watches for an account's `folders`: one IDLE connection per entry, so `*`
    watches INBOX only (new mail elsewhere waits for the interval poll); a special use is
    looked up as the connection opens (`one`)."""
    inbox = (EVERY, "\\Inbox")
    entries = [INBOX if special_use(e) in inbox or e == EVERY else e for e in wanted or [INBOX]]
    return tuple(dict.fromkeys(entries))


def one(entry: str, server: Lister) -> str | None:
    """The folder a watched entry means on this server (the first with that special use),
    or None when it has none."""
    if special_use(entry) is None:
        return entry
    return next(iter(resolve([entry], server.list_folders())), None)


_cache: dict[tuple[int, tuple[str, ...]], tuple[float, list[str]]] = {}
_cache_lock = threading.Lock()


def current(wanted: Sequence[str] | None, server: Server) -> list[str]:
    """The folders an account's `folders` (None: INBOX) mean now: as written when they are
    all names, else through the server's LIST."""
    entries = list(wanted or [INBOX])
    if not any(is_pattern(entry) for entry in entries):
        return entries
    return resolve(entries, server.list_folders(), gmail=server.gmail)


def for_account(account_id: int, wanted: Sequence[str] | None, server: Server) -> list[str]:
    """`current`, with the LIST kept FOLDER_LIST_SECONDS for the account."""
    entries = tuple(wanted or [INBOX])
    if not any(is_pattern(entry) for entry in entries):
        return list(entries)
    key = (account_id, entries)
    now = time.monotonic()
    with _cache_lock:
        kept = _cache.get(key)
    if kept is not None and now - kept[0] < get_settings().folder_list_seconds:
        return kept[1]
    found = current(entries, server)
    with _cache_lock:
        _cache[key] = (now, found)
    return found


def clear() -> None:
    with _cache_lock:
        _cache.clear()
