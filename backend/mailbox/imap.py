"""IMAP, closed: the only module that imports imapclient (a lint rule keeps it so).

It builds connections (TLS mode, trusted CAs, timeouts, login) and wraps each in an
`ImapSession` whose typed methods are the IMAP commands mailbeat uses. Everything
IMAP-specific stays here: search syntax and its quirks, the response keys, folder name
encoding (callers pass and get Unicode; modified UTF-7 is imapclient's job, here).

Every failure leaves this module as an `ImapError` whose `kind` says how the poller
should treat it: "auth" (wait for new credentials or the end of the backoff),
"connection" (retry with backoff), "protocol" (the server said no, or spoke nonsense).
`translate` is the one place socket, TLS and IMAP failures become those kinds.

A server cannot take more than one poll's worth from a worker:
- a literal (a message body) announced above the size the server stated for the message
  (at most MAX_MESSAGE_BYTES) plus slack is refused before a byte of it is read, and the
  connection closed (`ImapLiteralRefused`);
- `arm_deadline` closes the socket when a poll's time is up, whatever it is waiting for
  (a body trickled a byte at a time never trips the read timeout);
- UIDs outside RFC 3501's 1..2**32-1 are left out of searches and kept in `ignored_uids`.
"""

from __future__ import annotations

import ast
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar

from imapclient import IMAPClient, SocketTimeout, imap4, imap_utf7, tls
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from imapclient.response_parser import parse_fetch_response

from backend import netpolicy
from backend.config import get_settings
from backend.errors import MailbeatError
from backend.mailbox.folders import Listed
from backend.mailbox.uidranges import UidRange, clip, parse_set, to_ranges
from backend.models import Account, AuthMethod, ErrorKind, ImapSecurity

Stage = Literal["dns", "connect", "tls", "auth", "folder"]

DEFAULT_PORTS: dict[str, int] = {
    ImapSecurity.SSL: 993,
    ImapSecurity.STARTTLS: 143,
    ImapSecurity.NONE: 143,
}

_T = TypeVar("_T")

# RFC 3501: a UID is a non-zero 32-bit number.
MAX_UID = 2**32 - 1
# A literal may exceed the stated size by this much (line endings, a server's rounding).
LITERAL_SLACK_BYTES = 1024 * 1024
# Literals outside a body fetch (folder names, say) are small.
DEFAULT_LITERAL_LIMIT = 1024 * 1024
# Error texts from the server or the network are cut to this: they end up in last_error,
# the PollRun and the log, and must never carry a message's content.
ERROR_TEXT_MAX = 300
_LITERAL_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
# The sequence set of an ESEARCH answer's ALL (RFC 4731).
_ESEARCH_ALL = re.compile(rb"\bALL\s+([0-9:,]+)", re.IGNORECASE)
# One answer of a metadata FETCH as common servers send it: its items (those asked, and
# MODSEQ, which a CONDSTORE server adds), flags as plain atoms.
_META_LINE = re.compile(rb"\d+ \((.*)\)")
_META_ITEM = re.compile(
    rb"(?:UID (?P<uid>\d+)|RFC822\.SIZE (?P<size>\d+)|FLAGS \((?P<flags>[!#-'*-Z\\^-z|~ ]*)\)"
    rb'|INTERNALDATE "(?P<date>[^"]*)"'
    rb"|(?P<id>EMAILID|THREADID) (?:\((?P<value>[!#-'*-Z^-z|~]+)\)|NIL)"
    rb"|MODSEQ \(\d+\))(?: |\Z)",
    re.IGNORECASE,
)
# One answer of a body FETCH, as imaplib splits it around the literal.
_BODY_HEAD = re.compile(rb"\d+ \((?:UID (\d+) )?BODY\[\] \{\d+\}", re.IGNORECASE)
_BODY_TAIL = re.compile(rb"(?: UID (\d+))?\)", re.IGNORECASE)
_INTERNALDATE = re.compile(
    rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"
)
_MONTHS = {b"jan": 1, b"feb": 2, b"mar": 3, b"apr": 4, b"may": 5, b"jun": 6}
_MONTHS |= {b"jul": 7, b"aug": 8, b"sep": 9, b"oct": 10, b"nov": 11, b"dec": 12}


class ImapError(MailbeatError):
    status_code = 502
    kind: ErrorKind = ErrorKind.PROTOCOL
    stage: Stage = "folder"


class ImapAuthError(ImapError):
    kind: ErrorKind = ErrorKind.AUTH
    stage: Stage = "auth"


class ImapTlsRequired(ImapAuthError):
    """The server takes no credentials over this connection until TLS: none were sent,
    and a refreshed token would not change that."""


class ImapConnectionError(ImapError):
    kind: ErrorKind = ErrorKind.CONNECTION
    stage: Stage = "connect"


class ImapDnsError(ImapConnectionError):
    stage: Stage = "dns"


class ImapTlsError(ImapConnectionError):
    stage: Stage = "tls"


class ImapProtocolError(ImapError):
    kind: ErrorKind = ErrorKind.PROTOCOL
    stage: Stage = "folder"


class ImapThrottled(ImapError):
    """The provider sheds load or enforces a limit (`[UNAVAILABLE]`, `[THROTTLED]`,
    `[LIMIT]`, Gmail's bandwidth limit, too many connections): not the mailbox's fault.
    `retry_after`: the wait in seconds the server suggested, if it named one."""

    kind: ErrorKind = ErrorKind.THROTTLED

    def __init__(
        self, message: str, *, stage: Stage, retry_after: float | None, host_wide: bool = True
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.retry_after = retry_after
        # About the server's load or connections, not this account's own quota: the
        # host's other mailboxes slow down too (backend/mailbox/budget.throttled).
        self.host_wide = host_wide


class ImapLiteralRefused(ImapConnectionError):
    """The server announced a body far larger than it said the message was; the
    connection is closed (the literal is left unread) and the message can be skipped."""

    stage: Stage = "folder"

    def __init__(self, uid: int | None, announced: int, stated: int | None, limit: int) -> None:
        which = f"UID {uid}" if uid is not None else "a message"
        super().__init__(
            f"the server announced {announced} bytes for {which}, stated as "
            f"{stated if stated is not None else '?'} bytes (limit {limit}); refused unread, "
            "connection closed"
        )
        self.uid = uid
        self.announced = announced
        self.stated = stated


def ssl_context() -> ssl.SSLContext:
    """Verifying context: the system's CAs plus IMAP_CA_BUNDLE (a private CA)."""
    context = ssl.create_default_context()
    bundle = get_settings().imap_ca_bundle
    if bundle is None:
        return context
    if not bundle.is_file():
        raise ImapTlsError(
            f"IMAP_CA_BUNDLE is {bundle}, which does not exist: point it at a PEM file of "
            "the CA certificates to trust, or unset it"
        )
    try:
        context.load_verify_locations(cafile=str(bundle))
    except (ssl.SSLError, OSError) as exc:
        raise ImapTlsError(
            f"IMAP_CA_BUNDLE {bundle} cannot be used as CA certificates ({_text(exc)}): it "
            "must be a readable PEM file"
        ) from exc
    return context


def translate(exc: BaseException, *, stage: Stage = "folder") -> ImapError:
    """Map what imapclient, ssl and socket raise to one of our kinds."""
    if isinstance(exc, ImapError):
        return exc
    if isinstance(exc, LoginError) and "[PRIVACYREQUIRED]" in str(exc):
        # RFC 5530: the server wants TLS first, whatever the password.
        return ImapTlsRequired(
            "authentication refused: [PRIVACYREQUIRED]. The server wants TLS first: set "
            "imap_security to 'starttls' (or 'ssl' on the server's TLS port, usually 993)"
        )
    throttled = _throttled(exc, stage)
    if throttled is not None:
        return throttled
    if isinstance(exc, LoginError):
        return ImapAuthError(
            "authentication failed"
            + _response_code(exc)
            + ". Check the username and password (some providers want an app password)"
        )
    if isinstance(exc, netpolicy.OutboundRefused):
        return ImapConnectionError(exc.message)
    if isinstance(exc, socket.gaierror):
        return ImapDnsError(f"cannot resolve the IMAP host: {exc}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return ImapTlsError(f"TLS failed: {exc}")
    # Not a TLS error: while connecting (even on an implicit-TLS port) it is the network.
    network_stage: Stage = "connect" if stage in ("dns", "tls") else stage
    error: ImapError
    if isinstance(exc, TimeoutError):
        error = ImapConnectionError(f"timed out ({network_stage}): {exc or 'no answer'}")
        error.stage = network_stage
        return error
    if isinstance(exc, IMAPClientAbortError) and stage in ("dns", "connect", "tls"):
        # The greeting was not IMAP: whatever listens there is not repeated (/test would
        # be a port scanner that returns service banners).
        error = ImapConnectionError(f"connection failed ({network_stage}): not an IMAP server")
        error.stage = network_stage
        return error
    if isinstance(exc, IMAPClientAbortError | OSError | EOFError):
        error = ImapConnectionError(f"connection failed ({network_stage}): {_text(exc)}")
        error.stage = network_stage
        return error
    if isinstance(exc, IMAPClientError):
        error = ImapProtocolError(f"server refused ({stage}): {_text(exc)}")
        error.stage = stage
        return error
    raise exc


# What providers answer when they shed load or enforce a limit, on any command or as a
# BYE: RFC 5530's codes, Gmail's and Microsoft's words, and connection limits (Gmail,
# Dovecot's mail_max_userip_connections). A login refused with [UNAVAILABLE] is the
# server's trouble, not a wrong password.
_THROTTLE = re.compile(
    r"\[(UNAVAILABLE|THROTTLED|LIMIT|OVERQUOTA|INUSE)\b"
    r"|bandwidth limit|command or bandwidth|too many (simultaneous |concurrent )?connections"
    r"|maximum number of connections|server unavailable|rate limit|try again later",
    re.IGNORECASE,
)
# The throttle answers about one account's own use (its quota, Gmail's per-account
# bandwidth), not the server's load.
_ACCOUNT_ONLY = re.compile(r"OVERQUOTA|bandwidth", re.IGNORECASE)
_RETRY_AFTER = re.compile(
    r"(?:in|after|wait)\s+(\d{1,5})\s*(s|sec|secs|seconds?|m|min|mins|minutes?)\b", re.IGNORECASE
)


def _throttled(exc: BaseException, stage: Stage) -> ImapThrottled | None:
    if not isinstance(exc, IMAPClientError):  # LoginError and aborts (BYE) are too
        return None
    return throttle_answer(_text(exc), stage)


def throttle_answer(text: str, stage: Stage) -> ImapThrottled | None:
    """ImapThrottled when the server's answer `text` is a throttle or limit, else None."""
    found = _THROTTLE.search(text)
    if found is None:
        return None
    wait = _RETRY_AFTER.search(text)
    retry_after = None
    if wait is not None:
        retry_after = float(wait.group(1)) * (60 if wait.group(2).lower().startswith("m") else 1)
    # The code or phrase, not the free text around it: it may name the account.
    return ImapThrottled(
        f"throttled by the server ({stage}): {found.group(0).strip('[')}"
        + (f", retry after {retry_after:.0f}s" if retry_after is not None else ""),
        stage=stage,
        retry_after=retry_after,
        host_wide=_ACCOUNT_ONLY.search(found.group(0)) is None,
    )


def _response_code(exc: BaseException) -> str:
    """The server's response code ([AUTHENTICATIONFAILED], [UNAVAILABLE]) as ": [CODE]",
    or nothing: the free text after it is the server's, and not repeated."""
    found = re.search(r"\[[A-Z][A-Z0-9.-]{0,40}\]", str(exc))
    return f": {found.group(0)}" if found else ""


def _text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # imaplib hands on the server's words as a bytes repr: b'[AUTHENTICATIONFAILED] ...'
    quoted = _BYTES_REPR.fullmatch(text)
    if quoted is not None:
        with contextlib.suppress(ValueError, SyntaxError):
            text = ast.literal_eval(text).decode("utf-8", "replace")
    return text[:ERROR_TEXT_MAX]


_BYTES_REPR = re.compile(r"b(['\"]).*\1", re.DOTALL)


# -- what the server answers ----------------------------------------------------------


@dataclass(frozen=True)
class SelectedFolder:
    name: str
    uidvalidity: int
    exists: int  # messages in the folder
    uidnext: int | None  # the UID the next message will get, when the server says


@dataclass(frozen=True)
class FolderStatus:
    """STATUS of a folder: what changed since the last poll, without selecting it."""

    uidvalidity: int
    uidnext: int
    messages: int
    # With CONDSTORE (RFC 7162): grows with every change to the folder's messages.
    highestmodseq: int | None = None


@dataclass(frozen=True)
class MessageMeta:
    uid: int
    size: int  # RFC822.SIZE, as the server states it
    internal_date: datetime | None  # aware, UTC
    flags: list[str]
    # The server's identity of the message across folders (OBJECTID EMAILID, RFC 8474;
    # Gmail's X-GM-MSGID), when it offers one; its thread (THREADID, X-GM-THRID).
    email_id: str | None = None
    thread_id: str | None = None
    # Gmail's X-GM-LABELS (`labels`); None from any other server.
    labels: list[str] | None = None


# UIDs as ascending, disjoint, inclusive (first, last) ranges.
UidRanges = list[tuple[int, int]]


@dataclass(frozen=True)
class FolderChanges:
    """What changed in the selected folder: current flags by UID, and the UIDs expunged
    (QRESYNC's VANISHED; empty without it)."""

    flags: dict[int, list[str]]
    vanished: UidRanges
    # Gmail's labels of the changed messages by UID (X-GM-EXT-1 only).
    labels: dict[int, list[str]] = field(default_factory=dict)


# -- connections ----------------------------------------------------------------------


class ImapSession:
    """One connection to an IMAP server. Build it with `connect` or `open_account`; use
    it as a context manager (or call `close`). Every method raises only ImapError.

    A session is not thread-safe, but it may be handed between threads: the poller
    fetches on one thread while another stores, never both on the same session."""

    def __init__(self, client: IMAPClient) -> None:
        self._client = client
        # UIDs a search found outside 1..MAX_UID, left out.
        self.ignored_uids: list[int] = []
        self._deadline: threading.Timer | None = None
        self._deadline_seconds = 0.0
        self._expired = False
        self._broken = False
        self._selected = False
        # When it logged in (or connected): a pooled session has a maximum age.
        self.opened_at = time.monotonic()
        # Stated sizes of the bodies being fetched, by UID: their literals' limits.
        self._stated: dict[int, int] = {}
        self._max_bytes = get_settings().max_message_bytes
        # QRESYNC enabled (`enable_qresync`): expunges are reported as VANISHED UIDs.
        self.qresync = False
        # Called once when the session is closed: its slot in the connection budget.
        self._on_close: list[Callable[[], None]] = []
        imap = client._imap
        read = imap.read

        def capped_read(size: int) -> bytes:
            # imaplib reads a literal with read(size) right after the line announcing it
            # (`imap.mo` is that line's match): refuse it before reading any of it.
            match = getattr(imap, "mo", None)
            limit, uid = self._literal_limit(match.string if match else b"")
            if size > limit:
                self._shut()
                raise ImapLiteralRefused(uid, size, self._stated.get(uid or -1), limit)
            return bytes(read(size))

        imap.read = capped_read

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _command(self, command: Callable[[], _T], *, stage: Stage = "folder") -> _T:
        """Run one IMAP exchange. Every command goes through here, so this is where its
        failures are translated, and where a passed deadline is named as the cause."""
        if self._expired:
            raise self._deadline_error()
        try:
            return command()
        except (IMAPClientError, OSError, EOFError) as exc:
            if self._expired:
                raise self._deadline_error() from exc
            bye = self._client._imap.untagged_responses.pop("BYE", None)
            if bye:  # the server's last words say more than the EOF that followed them
                said = IMAPClientAbortError(f"BYE {bytes(bye[-1]).decode('utf-8', 'replace')}")
                raise translate(said, stage=stage) from exc
            raise translate(exc, stage=stage) from exc

    def arm_deadline(self, seconds: float) -> None:
        """Close the connection `seconds` from now, whatever it is doing then: the poll
        in any thread gets an ImapConnectionError instead of waiting on the server."""
        self._deadline_seconds = seconds
        self._deadline = threading.Timer(max(seconds, 0.0), self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        self._expired = True
        self._shut()

    def _deadline_error(self) -> ImapConnectionError:
        return ImapConnectionError(
            f"poll deadline passed ({self._deadline_seconds:.0f}s, POLL_DEADLINE_SECONDS): "
            "the server was too slow; connection closed"
        )

    def _shut(self) -> None:
        """Shut the socket: a read blocked on it (in any thread) returns at once."""
        self._broken = True
        with contextlib.suppress(Exception):
            self._client.socket().shutdown(socket.SHUT_RDWR)

    def _literal_limit(self, line: bytes) -> tuple[int, int | None]:
        """The largest literal accepted after this response line, and the UID it names."""
        found = _LITERAL_UID.search(line)
        uid = int(found.group(1)) if found else None
        if not self._stated:
            return DEFAULT_LITERAL_LIMIT, uid
        stated = self._stated.get(uid) if uid is not None else None
        if stated is None:  # a body whose UID comes after it: the batch's largest
            stated = max(self._stated.values())
        return min(stated, self._max_bytes) + LITERAL_SLACK_BYTES, uid

    def login(self, account: Account, credentials: Mapping[str, Any]) -> None:
        """Authenticate, then identify mailbeat to the server (ID)."""
        self._authenticate(account, credentials)
        self._identify()

    def enable_qresync(self) -> bool:
        """ENABLE QRESYNC (RFC 7162) where offered, once per session: from then on the
        server reports expunged UIDs as VANISHED. Only possible while no folder is
        selected (RFC 5161); a session that has one says no (False) and the caller does
        without. Sent only when a folder is about to be looked into, so an idle poll
        that a login starts pays no round trip for it."""
        if self.qresync or self._selected or not self.supports("QRESYNC"):
            return self.qresync
        enabled = self._command(lambda: self._client.enable("QRESYNC"))
        self.qresync = any(bytes(name).upper() == b"QRESYNC" for name in enabled)
        return self.qresync

    def _authenticate(self, account: Account, credentials: Mapping[str, Any]) -> None:
        """AUTHENTICATE PLAIN (LOGIN where the server offers no PLAIN), or AUTHENTICATE
        XOAUTH2 for an oauth2 account.

        The credentials travel base64-encoded in AUTHENTICATE, so nothing in them can end
        the command; LOGIN gets both as quoted strings. Control characters are refused
        either way (a CR LF in a username stored before the API refused it used to end
        LOGIN and start a command of the caller's own), and so is non-ASCII for LOGIN."""
        username = account.username
        self._refuse_plain_text_login()
        try:
            if account.auth_method == AuthMethod.OAUTH2:
                token = str(credentials["access_token"])
                _refuse_unsendable(username, token, ascii_only=False)
                self._command(lambda: self._client.oauth2_login(username, token), stage="auth")
                return
            password = str(credentials["password"])
        except KeyError as exc:
            raise ImapAuthError(f"the stored credentials lack {exc.args[0]!r}") from exc
        if self._command(lambda: self._client.has_capability("AUTH=PLAIN"), stage="auth"):
            _refuse_unsendable(username, password, ascii_only=False)
            self._command(lambda: self._client.plain_login(username, password), stage="auth")
        else:
            _refuse_unsendable(username, password, ascii_only=True)
            # imaplib quotes the password but sends the username as it is.
            quoted = '"' + username.replace("\\", "\\\\").replace('"', '\\"') + '"'
            self._command(lambda: self._client.login(quoted, password), stage="auth")

    def _identify(self) -> None:
        """RFC 2971 ID, sent after every login (IMAP_ID): some providers (NetEase) refuse
        every folder to a client that has not identified itself. A server without ID
        answers BAD, which changes nothing, so it is sent whether advertised or not; a
        connection that breaks on it still fails the login."""
        fields = get_settings().imap_id
        if not fields:
            return
        with contextlib.suppress(ImapProtocolError):
            self._command(lambda: self._client.id_(fields), stage="auth")

    def _refuse_plain_text_login(self) -> None:
        """A server that advertises LOGINDISABLED takes no credentials before TLS (RFC
        3501 6.2.3; Cyrus with `allowplaintext: no`): mailbeat sends none rather than a
        LOGIN the server would refuse once the password has crossed the network in clear."""
        if isinstance(self._client.socket(), ssl.SSLSocket):
            return
        if self._command(lambda: self._client.has_capability("LOGINDISABLED"), stage="auth"):
            raise ImapTlsRequired(
                "the server refuses logins without TLS (it advertises LOGINDISABLED) and no "
                "credentials were sent: set imap_security to 'starttls' (or 'ssl' on the "
                "server's TLS port, usually 993)"
            )

    def resume(self) -> None:
        """Before a kept session's next poll, which this also shows it still answers:
        CLOSE the folder its last poll left selected (a STATUS must not be of the
        selected folder, RFC 3501 warns; CLOSE after EXAMINE expunges nothing), or NOOP."""
        if self._selected:
            self._command(self._client.close_folder)
            self._selected = False
        else:
            self._command(self._client.noop)

    def end_poll(self) -> bool:
        """Ready the session to be kept: the deadline is cancelled; the folder is left
        when it is next used (`resume`), so a session the pool lets go is not sent a
        CLOSE before its LOGOUT. False when it cannot be used again: it broke, expired
        or was closed."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._broken or self._expired:
            return False
        self.ignored_uids = []
        return True

    def on_close(self, callback: Callable[[], None]) -> None:
        """Have `callback` called once, after the connection is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Log out politely; a connection that is already broken is just shut."""
        if self._deadline is not None:
            self._deadline.cancel()
        broken, self._broken = self._broken, True  # never used again
        try:
            if broken:
                raise ConnectionError("closed by mailbeat")
            self._client.logout()
        except Exception:
            with contextlib.suppress(Exception):
                self._client.shutdown()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    def tls_version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"), or None on a plain connection."""
        sock = self._client.socket()
        return sock.version() if isinstance(sock, ssl.SSLSocket) else None

    # -- folders ------------------------------------------------------------------------

    def select(self, folder: str) -> SelectedFolder:
        """EXAMINE the folder (read-only: mailbeat never sets \\Seen or expunges)."""
        info = self._command(lambda: self._client.select_folder(folder, readonly=True))
        self._selected = True
        uidvalidity = info.get(b"UIDVALIDITY")
        if uidvalidity is None:
            raise ImapProtocolError("the server sent no UIDVALIDITY")
        uidnext = info.get(b"UIDNEXT")
        return SelectedFolder(
            name=folder,
            uidvalidity=int(uidvalidity),
            exists=int(info.get(b"EXISTS", 0)),
            uidnext=None if uidnext is None else int(uidnext),
        )

    def list_folders(self) -> list[Listed]:
        """LIST "" "*": every folder with its attributes (RFC 6154's special uses among
        them), names decoded from modified UTF-7."""
        listing = self._command(self._client.list_folders)
        return [
            Listed(
                name=_decoded(name),
                attributes=frozenset(_decoded(flag).lower() for flag in flags),
            )
            for flags, _delimiter, name in listing
        ]

    def status(self, folder: str) -> FolderStatus:
        """STATUS: a folder's UIDVALIDITY, UIDNEXT and message count, without selecting;
        and its HIGHESTMODSEQ where the server has CONDSTORE (in the same command)."""
        wanted = [b"UIDVALIDITY", b"UIDNEXT", b"MESSAGES"]
        if self.supports("CONDSTORE"):
            wanted.append(b"HIGHESTMODSEQ")
        info = self._command(lambda: self._client.folder_status(folder, wanted))
        try:
            modseq = info.get(b"HIGHESTMODSEQ")
            return FolderStatus(
                uidvalidity=int(info[b"UIDVALIDITY"]),
                uidnext=int(info[b"UIDNEXT"]),
                messages=int(info[b"MESSAGES"]),
                # 0: the folder has no modseqs (RFC 7162, NOMODSEQ), as good as none.
                highestmodseq=int(modseq) if modseq else None,
            )
        except KeyError as exc:
            raise ImapProtocolError(f"STATUS without {exc.args[0].decode()}") from exc

    def supports(self, capability: str) -> bool:
        """Whether the server offers this capability (as it stated after the login)."""
        return bool(self._command(lambda: self._client.has_capability(capability)))

    # -- the selected folder's messages -------------------------------------------------

    def search(
        self,
        *,
        uid_from: int | None = None,
        uid_to: int | None = None,
        since: date | None = None,
        before: date | None = None,
    ) -> list[int]:
        """UIDs of the selected folder matching every criterion given (all messages when
        none is), ascending. `since`/`before` compare INTERNALDATE's day (`since`
        inclusive) in the server's time zone.

        The UID range is exact: `UID n:*` always matches the newest message, even when its
        UID is below n; such a UID is dropped here."""
        criteria: list[Any] = []
        if uid_from is not None or uid_to is not None:
            criteria += ["UID", f"{uid_from or 1}:{uid_to or '*'}"]
        if since is not None:
            criteria += ["SINCE", since]
        if before is not None:
            criteria += ["BEFORE", before]
        found = self._command(lambda: self._client.search(criteria or ["ALL"]))
        self.ignored_uids += [uid for uid in found if not 1 <= uid <= MAX_UID]
        low, high = uid_from or 1, min(uid_to or MAX_UID, MAX_UID)
        return sorted(uid for uid in found if low <= uid <= high)

    def uid_ranges(self) -> list[UidRange]:
        """Every UID of the selected folder, as ranges (backend/mailbox/uidranges.py).
        With ESEARCH (RFC 4731) the server answers with one sequence set ("1:99998,
        100000"): a folder of 100,000 messages costs one short line instead of 600 kB of
        numbers. Without it, a plain SEARCH ALL. UIDs outside 1..MAX_UID are left out."""
        if not self._command(lambda: self._client.has_capability("ESEARCH")):
            return to_ranges(self.search())
        lines = self._command(
            lambda: self._client._raw_command_untagged(
                b"SEARCH", [b"RETURN", b"(ALL)", b"ALL"], response_name="ESEARCH"
            )
        )
        text = b" ".join(line for line in lines if isinstance(line, bytes))
        match = _ESEARCH_ALL.search(text)
        if match is None:
            return []  # no ALL: the folder is empty
        try:
            ranges = parse_set(match.group(1).decode())
        except ValueError as exc:
            raise ImapProtocolError("the server sent a malformed ESEARCH answer") from exc
        return clip(ranges, 1, MAX_UID)

    def fetch_metadata(self, uids: Sequence[int]) -> dict[int, MessageMeta]:
        """Size, INTERNALDATE and flags of these UIDs; a UID expunged since is missing."""
        if not uids:
            return {}
        items = ["UID", "RFC822.SIZE", "INTERNALDATE", "FLAGS", *self._identity_items()]
        data = self._command(lambda: self._uid_fetch(_uid_set(uids), f"({' '.join(items)})", None))
        return read_metas(data)

    @property
    def gmail(self) -> bool:
        """Whether the server speaks Gmail's extensions (X-GM-EXT-1): labels, and one
        message in every label's folder and in All Mail."""
        return self.supports("X-GM-EXT-1")

    def _identity_items(self) -> list[str]:
        if self.supports("OBJECTID"):
            return ["EMAILID", "THREADID"]
        if self.gmail:
            return ["X-GM-MSGID", "X-GM-THRID", "X-GM-LABELS"]
        return []

    def fetch_bodies(self, stated: Mapping[int, int]) -> dict[int, bytes]:
        """The raw messages of these UIDs, given with the sizes the server stated for them
        (BODY.PEEK[]: \\Seen is left alone); a UID expunged since is missing. A body
        announced above its stated size (at most MAX_MESSAGE_BYTES) plus slack is
        refused: ImapLiteralRefused, and the connection is closed."""
        if not stated:
            return {}
        self._stated = dict(stated)
        try:
            data = self._command(
                lambda: self._uid_fetch(_uid_set(stated), "(UID BODY.PEEK[])", None)
            )
        finally:
            self._stated = {}
        return read_bodies(data)

    # -- changes (backend/mailbox/changes.py) -------------------------------------------

    def fetch_changes(self, modseq: int) -> FolderChanges:
        """`UID FETCH 1:* (FLAGS) (CHANGEDSINCE modseq)` (CONDSTORE): the flags of every
        message of the selected folder changed since; with QRESYNC also `VANISHED`: the
        UIDs expunged since, as compact ranges."""
        modifiers = f"CHANGEDSINCE {modseq}" + (" VANISHED" if self.qresync else "")
        flags, vanished, labels = self._uid_fetch_flags(b"1:*", modifiers, labels=self.gmail)
        return FolderChanges(flags=flags, vanished=vanished, labels=labels)

    def fetch_flags(self, newest: int | None = None, *, exists: int = 0) -> dict[int, list[str]]:
        """The flags of the selected folder's messages by UID: all of them (`UID FETCH 1:*
        (FLAGS)`), or the `newest` of the `exists` it holds, by sequence number (no
        search needed)."""
        if newest is None:
            return self._uid_fetch_flags(b"1:*", None)[0]
        if newest <= 0 or exists <= 0:
            return {}
        first = max(1, exists - newest + 1)
        return self._uid_fetch_flags(b"%d:*" % first, None, by_uid=False)[0]

    def uid_set(self) -> UidRanges:
        """Every UID of the selected folder: with ESEARCH (RFC 4731) sent as compact
        ranges, so 100,000 messages are a few lines, not 100,000 numbers."""
        if not self.supports("ESEARCH"):
            return merge_ranges([(uid, uid) for uid in self.search()])
        imap = self._client._imap

        def esearch() -> list[bytes]:
            typ, data = imap._simple_command("UID", "SEARCH", "RETURN", "(ALL)", "ALL")
            self._ok("UID SEARCH", typ, data)
            return [bytes(line) for line in imap.untagged_responses.pop("ESEARCH", []) if line]

        found: UidRanges = []
        for line in self._command(esearch):
            match = _ESEARCH_ALL.search(line)
            if match is not None:
                found += _sequence_set(match.group(1))
        return merge_ranges(found)

    def _uid_fetch_flags(
        self, messages: bytes, modifiers: str | None, *, by_uid: bool = True, labels: bool = False
    ) -> tuple[dict[int, list[str]], UidRanges, dict[int, list[str]]]:
        """Flags by UID, the UIDs VANISHED, and with `labels` Gmail's labels by UID."""
        imap = self._client._imap

        def fetch() -> tuple[dict[int, list[str]], UidRanges, dict[int, list[str]]]:
            imap.untagged_responses.pop("VANISHED", None)
            items = "(UID FLAGS X-GM-LABELS)" if labels else "(UID FLAGS)"
            data = self._uid_fetch(messages, items, modifiers, by_uid=by_uid)
            parsed = parse_fetch_response(data, True, True)
            vanished: UidRanges = []
            for line in imap.untagged_responses.pop("VANISHED", []):
                vanished += _sequence_set(bytes(line).split(b" ")[-1])
            valid = {uid: item for uid, item in parsed.items() if 1 <= uid <= MAX_UID}
            found = {uid: _labels(item) for uid, item in valid.items()} if labels else {}
            return (
                {uid: _flags(item) for uid, item in valid.items()},
                merge_ranges(vanished),
                {uid: value for uid, value in found.items() if value is not None},
            )

        return self._command(fetch)

    def _uid_fetch(
        self, messages: bytes, items: str, modifiers: str | None, *, by_uid: bool = True
    ) -> list[Any]:
        """A FETCH's untagged answers as imaplib holds them, to parse here."""
        imap = self._client._imap
        args: list[Any] = ["UID", "FETCH"] if by_uid else ["FETCH"]
        args += [messages, items, *([f"({modifiers})"] if modifiers else [])]
        tag = imap._command(*args)
        typ, data = imap._command_complete("FETCH", tag)
        self._ok("FETCH", typ, data)
        return list(imap._untagged_response(typ, data, "FETCH")[1])

    def _ok(self, command: str, typ: str, data: list[Any]) -> None:
        if typ != "OK":
            said = b" ".join(bytes(part) for part in data if part).decode("utf-8", "replace")
            raise IMAPClientError(f"{command} command error: {typ} {said}")

    # -- push ----------------------------------------------------------------------------

    def supports_idle(self) -> bool:
        """Whether the server offers IDLE (RFC 2177)."""
        return bool(self._command(lambda: self._client.has_capability("IDLE")))

    def idle(self, selected: SelectedFolder) -> IdleLink:
        """Hand the connection, with a folder selected (`selected`: what `select` said),
        to a caller that waits on many sockets at once (backend/push/watcher.py): IDLE is
        sent, and from now on the session is driven only through the IdleLink returned.
        The deadline, if armed, is cancelled: the caller times the server's answers
        itself."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._expired or self._broken:
            raise self._deadline_error() if self._expired else ImapConnectionError("closed")
        if not self._selected:
            raise ImapProtocolError("IDLE needs a selected folder")
        self._broken = True  # no imapclient command on it from now on
        link = IdleLink(self._client, selected)
        # The connection is the link's now, and so is what its closing releases.
        for callback in self._on_close:
            link.on_close(callback)
        self._on_close = []
        link.start()
        return link

    def status_link(self, folders: Sequence[str]) -> StatusLink:
        """Hand the logged-in connection to a caller that waits on many sockets at once
        (backend/push/held.py): from now on it asks these folders' STATUS through the
        StatusLink returned, never through imapclient. The deadline, if armed, is
        cancelled: the caller times the server's answers itself."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._expired or self._broken:
            raise self._deadline_error() if self._expired else ImapConnectionError("closed")
        modseq = self.supports("CONDSTORE")
        self._broken = True  # no imapclient command on it from now on
        link = StatusLink(self._client, folders, modseq=modseq)
        # The connection is the link's now, and so is what its closing releases.
        link._on_close, self._on_close = self._on_close, []
        return link


# The longest line accepted from a server while idling; a literal during IDLE (a FETCH
# with a quoted header, say) is skipped up to DEFAULT_LITERAL_LIMIT.
IDLE_LINE_MAX = 64 * 1024
# Bytes taken from one connection per `read`: a server that floods gets a turn, not the
# watcher's thread.
IDLE_READ_MAX = 1024 * 1024


def _receive(sock: socket.socket) -> tuple[bytes, bool]:
    """What a non-blocking link's server has sent (at most IDLE_READ_MAX), and whether
    it closed the connection."""
    received = bytearray()
    while len(received) < IDLE_READ_MAX:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            break
        except OSError as exc:
            raise translate(exc) from exc
        if not data:
            return bytes(received), True
        received += data
    return bytes(received), False


_IDLE_LITERAL = re.compile(rb"\{(\d+)\}$")


class IdleLink:
    """An IDLE connection driven by its caller's selector: non-blocking, never waits.

    `fileno()` is what to wait on; when it is readable, `read()` takes what the server
    sent and says whether the folder changed (EXISTS, EXPUNGE, FETCH, any untagged
    response but OK/NO/BAD). `renew()` ends IDLE (DONE) and, once the server confirms,
    starts it again by itself (servers drop an IDLE after 29 minutes). `end()` sends DONE
    and LOGOUT; `close()` shuts the socket. `waiting_since` is the monotonic time since
    which an answer is awaited (None while idling): the caller gives up after its read
    timeout. Every failure is an ImapError; a BYE, an EOF or a refused IDLE end the link.

    `reselect` says why the folder is to be selected again, once the server has shown
    that the one selected is gone (deleted and perhaps recreated) without ending the
    link: every message expunged (Cyrus sends only that to a session on a deleted
    folder), or a new UIDVALIDITY in an untagged OK.
    """

    def __init__(self, client: IMAPClient, selected: SelectedFolder) -> None:
        self._client = client
        # Called once when the link is closed (the session's, handed on by `idle`).
        self._on_close: list[Callable[[], None]] = []
        self._imap = client._imap
        self._sock: socket.socket = client.socket()
        self._sock.settimeout(None)
        self._sock.setblocking(False)
        self._buffer = bytearray()
        self._skip = 0  # literal bytes still to skip
        self._tag = b""
        # starting (IDLE sent), idling, renewing (DONE sent), ending (DONE LOGOUT sent)
        self.state = "new"
        self.waiting_since: float | None = None
        self.folder = selected.name
        self.uidvalidity = selected.uidvalidity
        self.exists = selected.exists
        self.reselect: str | None = None
        # What imaplib had already read past the SELECT's answer, unsolicited news.
        with contextlib.suppress(BlockingIOError, ssl.SSLWantReadError, OSError):
            self._buffer += self._imap.file.peek(IDLE_READ_MAX)
        if self._buffer:
            self._imap.file.read(len(self._buffer))

    def fileno(self) -> int:
        return self._sock.fileno()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise translate(exc) from exc

    def _next_tag(self) -> bytes:
        tag: bytes = self._imap._new_tag()
        return tag

    def start(self) -> None:
        self._tag = self._next_tag()
        self._send(self._tag + b" IDLE\r\n")
        self.state = "starting"
        self.waiting_since = time.monotonic()

    def renew(self) -> None:
        """DONE, then IDLE again when the server has answered it."""
        if self.state != "idling":
            return
        self._send(b"DONE\r\n")
        self.state = "renewing"
        self.waiting_since = time.monotonic()

    def end(self) -> None:
        """DONE (if idling) and LOGOUT; the server answers BYE and closes."""
        done = b"DONE\r\n" if self.state == "idling" else b""
        with contextlib.suppress(ImapError):
            self._send(done + self._next_tag() + b" LOGOUT\r\n")
        self.state = "ending"
        self.waiting_since = time.monotonic()

    def close(self) -> None:
        self.state = "closed"
        with contextlib.suppress(Exception):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._client.shutdown()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Have `callback` called once, after the link is closed."""
        self._on_close.append(callback)

    def read(self) -> bool:
        """Take what the server sent; True when it reported a change to the folder.
        Raises ImapConnectionError once the server has closed (after `end()`, too)."""
        data, closed = _receive(self._sock)
        self._buffer += data
        changed = self._lines()
        if closed:
            raise ImapConnectionError("connection lost: the server closed it")
        return changed

    def _lines(self) -> bool:
        changed = False
        while self._buffer:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > IDLE_LINE_MAX:
                    raise ImapProtocolError(
                        f"the server sent a line over {IDLE_LINE_MAX} bytes while idling"
                    )
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            changed = self._line(line) or changed
        return changed

    def _line(self, line: bytes) -> bool:
        literal = _IDLE_LITERAL.search(line)
        if literal is not None:
            size = int(literal.group(1))
            if size > DEFAULT_LITERAL_LIMIT:
                raise ImapLiteralRefused(None, size, None, DEFAULT_LITERAL_LIMIT)
            self._skip = size
        if line.startswith(b"+"):
            if self.state == "starting":
                self.state = "idling"
                self.waiting_since = None
            return False
        if line.startswith(b"* "):
            word = line[2:].split(b" ", 2)
            kind = word[0].upper()
            if kind == b"BYE":
                if self.state == "ending":
                    return False
                # A provider shedding load ends IDLE links too ([UNAVAILABLE]).
                throttle = throttle_answer(_said(line), "connect")
                if throttle is not None:
                    raise throttle
                raise ImapConnectionError(f"connection lost: the server said BYE {_said(line)}")
            self._count(word)
            # OK ("Still here"), NO and BAD carry no news of the folder.
            return kind not in (b"OK", b"NO", b"BAD", b"CAPABILITY")
        tag, _, rest = line.partition(b" ")
        if tag != self._tag:
            return False  # the LOGOUT's answer, or an old command's
        if not rest.upper().startswith(b"OK") or self.state == "starting":
            # Refused, or ended before it began: no IDLE to wait on.
            raise ImapProtocolError(f"server refused (IDLE): {_said(line)}")
        if self.state == "renewing":
            self.start()
        return False

    def _count(self, word: list[bytes]) -> None:
        """Follow the selected folder's size and UIDVALIDITY through the untagged
        responses (`word`: the line after "* ", split twice), for `reselect`."""
        if len(word) < 2:
            return
        if word[0].isdigit() and word[1].upper() == b"EXISTS":
            self.exists = int(word[0])
        elif word[0].isdigit() and word[1].upper() == b"EXPUNGE" and self.exists > 0:
            self.exists -= 1
            if self.exists == 0:
                self.reselect = "every message expunged"
        elif word[0].upper() == b"OK" and word[1].upper() == b"[UIDVALIDITY":
            found = re.match(rb"(\d+)\]", word[2] if len(word) > 2 else b"")
            if found is not None and int(found.group(1)) != self.uidvalidity:
                self.reselect = f"UIDVALIDITY {self.uidvalidity} -> {int(found.group(1))}"


_STATUS_ITEMS = re.compile(rb"\(([^()]*)\)\s*$")


class StatusLink:
    """A logged-in connection that answers STATUS for a set of folders, driven by its
    caller's selector: non-blocking, never waits (backend/push/held.py).

    `ask()` sends one STATUS per folder, pipelined; once readable, `read()` takes what
    the server sent and returns every folder's FolderStatus when the last answer is in
    (None before). `waiting_since` is the monotonic time since which an answer is
    awaited (None when none is): the caller gives up after its read timeout. `end()`
    sends LOGOUT; `close()` shuts the socket. Every failure is an ImapError; a BYE, an
    EOF or a refused STATUS end the link."""

    def __init__(self, client: IMAPClient, folders: Sequence[str], *, modseq: bool) -> None:
        self._client = client
        self._imap = client._imap
        self.folders = tuple(folders)
        items = b"UIDVALIDITY UIDNEXT MESSAGES" + (b" HIGHESTMODSEQ" if modseq else b"")
        self._commands = [
            (folder, b" STATUS " + client._normalise_folder(folder) + b" (" + items + b")\r\n")
            for folder in self.folders
        ]
        self._sock: socket.socket = client.socket()
        self._sock.settimeout(None)
        self._sock.setblocking(False)
        self._buffer = bytearray()
        self._skip = 0  # literal bytes still to skip
        self._carry = b""  # a line cut by a literal (a folder name sent as one)
        self._pending: list[tuple[bytes, str]] = []  # (tag, folder) awaiting their OK
        self._found: dict[str, FolderStatus] = {}
        self._on_close: list[Callable[[], None]] = []  # its budget slot's release
        self.ending = False
        self.waiting_since: float | None = None
        # Whatever imaplib had read past the login's answer.
        with contextlib.suppress(BlockingIOError, ssl.SSLWantReadError, OSError):
            self._buffer += self._imap.file.peek(IDLE_READ_MAX)
        if self._buffer:
            self._imap.file.read(len(self._buffer))

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self.ending

    def ask(self) -> None:
        """STATUS for every folder, in one write."""
        if self.busy:
            return
        self._found = {}
        out = bytearray()
        for folder, command in self._commands:
            tag: bytes = self._imap._new_tag()
            self._pending.append((tag, folder))
            out += tag + command
        self._send(bytes(out))
        self.waiting_since = time.monotonic()

    def end(self) -> None:
        with contextlib.suppress(ImapError):
            self._send(self._imap._new_tag() + b" LOGOUT\r\n")
        self.ending = True
        self.waiting_since = time.monotonic()

    def close(self) -> None:
        self.ending = True
        with contextlib.suppress(Exception):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self._client.shutdown()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise translate(exc) from exc

    def read(self) -> dict[str, FolderStatus] | None:
        """Take what the server sent; every folder's STATUS once the last is in."""
        data, closed = _receive(self._sock)
        self._buffer += data
        done = self._lines()
        if closed:
            raise ImapConnectionError("connection lost: the server closed it")
        return done

    def _lines(self) -> dict[str, FolderStatus] | None:
        done = None
        while self._buffer:
            if self._skip:
                dropped = min(self._skip, len(self._buffer))
                del self._buffer[:dropped]
                self._skip -= dropped
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > IDLE_LINE_MAX:
                    raise ImapProtocolError(f"the server sent a line over {IDLE_LINE_MAX} bytes")
                break
            line = self._carry + bytes(self._buffer[:end])
            del self._buffer[: end + 2]
            literal = _IDLE_LITERAL.search(line)
            if literal is not None:
                self._skip = int(literal.group(1))
                if self._skip > IDLE_LINE_MAX:
                    raise ImapProtocolError(f"the server sent a literal of {self._skip} bytes")
                self._carry = line[: literal.start()]
                continue
            self._carry = b""
            done = self._line(line) or done
        return done

    def _line(self, line: bytes) -> dict[str, FolderStatus] | None:
        if line.startswith(b"* "):
            kind = line[2:].split(b" ", 1)[0].upper()
            if kind == b"BYE" and not self.ending:
                raise ImapConnectionError(f"connection lost: the server said BYE {_said(line)}")
            if kind == b"STATUS" and self._pending:
                folder = next(
                    (f for _tag, f in self._pending if f not in self._found), self._pending[0][1]
                )
                self._found[folder] = _status_of(line)
            return None
        tag, _, rest = line.partition(b" ")
        index = next((i for i, (t, _f) in enumerate(self._pending) if t == tag), None)
        if index is None:
            return None  # the LOGOUT's answer
        _tag, folder = self._pending.pop(index)
        if not rest.upper().startswith(b"OK") or folder not in self._found:
            raise ImapProtocolError(f"server refused (STATUS {folder!r}): {_said(line)}")
        if self._pending:
            return None
        self.waiting_since = None
        return dict(self._found)


def _status_of(line: bytes) -> FolderStatus:
    """`* STATUS name (UIDNEXT 5 UIDVALIDITY 1 MESSAGES 4 HIGHESTMODSEQ 9)`."""
    items = _STATUS_ITEMS.search(line)
    words = items.group(1).split() if items else []
    info = {words[i].upper(): words[i + 1] for i in range(0, len(words) - 1, 2)}
    try:
        modseq = int(info.get(b"HIGHESTMODSEQ", b"0"))
        return FolderStatus(
            uidvalidity=int(info[b"UIDVALIDITY"]),
            uidnext=int(info[b"UIDNEXT"]),
            messages=int(info[b"MESSAGES"]),
            highestmodseq=modseq or None,
        )
    except (KeyError, ValueError) as exc:
        raise ImapProtocolError(f"STATUS without its items: {_said(line)}") from exc


def _said(line: bytes) -> str:
    return line.decode("utf-8", "replace")[:ERROR_TEXT_MAX]


def is_encodable(value: str) -> bool:
    """Whether UTF-8 can write `value`: a lone surrogate ("\\ud800" from JSON) it cannot,
    and the codec's error would name the character and its position."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_unsendable(username: str, secret: str, *, ascii_only: bool) -> None:
    """Never the character or where it is: these are credentials."""
    for what, value in (("username", username), ("password or token", secret)):
        if not is_encodable(value):
            raise ImapAuthError(
                f"the stored {what} is not valid Unicode text (a lone surrogate), which "
                "nothing can send; set it again through the API"
            )
        if any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in value):
            raise ImapAuthError(
                f"the stored {what} contains control characters, which IMAP cannot carry; "
                "set it again through the API"
            )
        if ascii_only and not value.isascii():
            raise ImapAuthError(
                f"the stored {what} is not ASCII, and this server offers only LOGIN, which "
                "carries nothing else"
            )


# imapclient has no type hints: its classes are Any to mypy.
def _imap_socket(host: str, port: int, timeout: float | None) -> socket.socket:
    sock = netpolicy.connect(host, port, timeout)
    # IMAP is a conversation of small writes (AUTHENTICATE, then its continuation): with
    # Nagle's algorithm the second write waits for the delayed ACK of the first, ~40 ms
    # on every login.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _CheckedIMAP4(imap4.IMAP4WithTimeout):  # type: ignore[misc]
    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        return _imap_socket(self.host, self.port, timeout or self._timeout)


class _CheckedIMAP4TLS(tls.IMAP4_TLS):  # type: ignore[misc]
    def _create_socket(self, timeout: float | None = None) -> socket.socket:
        sock = _imap_socket(self.host, self.port, timeout or self._timeout)
        # The certificate is still checked against the host name, not the address.
        wrapped: socket.socket = tls.wrap_socket(sock, self.ssl_context, self.host)
        return wrapped


class _CheckedClient(IMAPClient):  # type: ignore[misc]
    """IMAPClient whose socket is made by the outbound policy (backend/netpolicy.py):
    connected to an address that passed the check, never to the name resolved again."""

    def _create_IMAP4(self) -> imap4.IMAP4WithTimeout | tls.IMAP4_TLS:  # noqa: N802 - imapclient's name
        timeout = getattr(self._timeout, "connect", None)
        if self.ssl:
            return _CheckedIMAP4TLS(self.host, self.port, self.ssl_context, timeout)
        return _CheckedIMAP4(self.host, self.port, timeout)


def connect(
    host: str,
    port: int | None,
    security: str,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> ImapSession:
    """An unauthenticated connection; TLS (implicit or STARTTLS) is verified."""
    settings = get_settings()
    timeout = SocketTimeout(
        connect=connect_timeout or settings.imap_connect_timeout,
        read=read_timeout or settings.imap_read_timeout,
    )
    port = port or DEFAULT_PORTS.get(security, 993)
    # Before connecting: a bad IMAP_CA_BUNDLE is named, and no connection is left open.
    context = None if security == ImapSecurity.NONE else ssl_context()
    # Resolution happens as the socket is made, through the outbound policy: a name that
    # does not resolve is a socket.gaierror, translated to the dns stage from any stage.
    stage: Stage = "connect"
    try:
        if security == ImapSecurity.SSL:
            stage = "tls"  # the handshake is part of connecting on an implicit-TLS port
            client = _connect_tls(host, port, context, timeout)
        else:
            client = _connect_plain(host, port, timeout)
            if security == ImapSecurity.STARTTLS:
                stage = "tls"
                client.starttls(context)
    except (IMAPClientError, OSError, EOFError, netpolicy.OutboundRefused) as exc:
        raise translate(exc, stage=stage) from exc
    # Aware datetimes from INTERNALDATE (imapclient otherwise converts to naive local time).
    client.normalise_times = False
    # Folder names are str on our side; imapclient encodes them as modified UTF-7.
    client.folder_encode = True
    # imapclient turns imaplib's debug output up to 5, and imaplib then formats the repr
    # of every response, message bodies included, whether or not anything is logged:
    # that costs more than parsing the messages.
    client._imap.debug = 0
    return ImapSession(client)


# An IMAP server greets as soon as a connection is open. Silence on a plain connection
# is most often an implicit-TLS port waiting for a handshake: say so after this long
# rather than after the whole connect timeout.
GREETING_SECONDS = 5.0
_PLAIN_TEXT_REASONS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


def _connect_plain(host: str, port: int, timeout: SocketTimeout) -> IMAPClient:
    greeting = min(timeout.connect or GREETING_SECONDS, GREETING_SECONDS)
    try:
        client = _CheckedClient(
            host, port=port, ssl=False, timeout=SocketTimeout(connect=greeting, read=timeout.read)
        )
    except TimeoutError as exc:
        if _speaks_tls(host, port, greeting):
            raise ImapTlsError(
                f"{host}:{port} expects TLS from the first byte (implicit TLS, as on port "
                "993): set imap_security to 'ssl'"
            ) from exc
        raise
    return client


def _connect_tls(
    host: str, port: int, context: ssl.SSLContext | None, timeout: SocketTimeout
) -> IMAPClient:
    try:
        return _CheckedClient(host, port=port, ssl=True, ssl_context=context, timeout=timeout)
    except ssl.SSLError as exc:
        if exc.reason in _PLAIN_TEXT_REASONS:
            raise ImapTlsError(
                f"{host}:{port} answered in plain text, not TLS: set imap_security to "
                "'starttls' (or 'none' on a trusted network), or use the server's TLS port "
                "(usually 993)"
            ) from exc
        raise


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the port answers a TLS handshake. Only probes: nothing is sent over it."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE  # any certificate will do to recognise TLS
    try:
        with (
            netpolicy.connect(host, port, timeout) as raw,
            probe.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in (exc.reason or "")  # a TLS alert is TLS too
    except (OSError, netpolicy.OutboundRefused):
        return False


def open_account(
    account: Account,
    *,
    credentials: Callable[[bool], Mapping[str, Any]],
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> ImapSession:
    """Connect and log in. `credentials(force_refresh)` gives the secrets; an XOAUTH2
    login that fails is retried once with a freshly refreshed access token, since
    providers revoke tokens before their stated expiry."""
    session = connect(
        account.imap_host,
        account.imap_port,
        account.imap_security,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    try:
        try:
            session.login(account, credentials(False))
        except ImapAuthError as exc:
            if account.auth_method != AuthMethod.OAUTH2 or isinstance(exc, ImapTlsRequired):
                raise
            # A failed AUTHENTICATE leaves the connection unauthenticated: try again on it.
            session.login(account, credentials(True))
    except BaseException:
        session.close()
        raise
    return session


def _flags(data: Mapping[bytes, Any]) -> list[str]:
    # \Recent belongs to the session that saw the message first, not the message. A
    # flag of digits is an int to imapclient, NIL is None (dropped).
    return [
        _decoded(flag)
        for flag in data.get(b"FLAGS", ())
        if flag is not None and not (isinstance(flag, bytes) and flag.lower() == b"\\recent")
    ]


def read_metas(data: list[Any]) -> dict[int, MessageMeta]:
    """A metadata FETCH's answers (`fetch_metadata`) by UID: read by regular expressions
    when every line is as common servers send it (imapclient's reader took a tenth of a
    first sync's CPU), else by imapclient's parser; tests hold the two equal."""
    fast = _read_metas_fast(data)
    return _read_metas_parsed(data) if fast is None else fast


def _read_metas_fast(data: list[Any]) -> dict[int, MessageMeta] | None:
    """None for anything unusual (a literal, a quoted flag, Gmail's items, a date that
    is not a valid `dd-Mon-yyyy hh:mm:ss +zzzz`, an answer without UID or repeated)."""
    metas: dict[int, MessageMeta] = {}
    for line in data:
        found = _META_LINE.fullmatch(line) if isinstance(line, bytes) else None
        if found is None:
            return None
        fields: dict[str, Any] = {"uid": 0, "size": 0, "internal_date": None, "flags": []}
        body, position = found[1], 0
        while position < len(body):
            item = _META_ITEM.match(body, position)
            if item is None:
                return None
            position = item.end()
            if item["uid"]:
                fields["uid"] = int(item["uid"])
            elif item["size"]:
                fields["size"] = int(item["size"])
            elif item["flags"] is not None:
                fields["flags"] = [
                    flag.decode()
                    for flag in item["flags"].split()
                    if flag.upper() != b"NIL" and flag.lower() != b"\\recent"
                ]
            elif item["date"] is not None:
                fields["internal_date"] = _internal_date(item["date"])
                if fields["internal_date"] is None:
                    return None
            elif item["id"]:
                value = item["value"]
                if value is not None and value.upper() == b"NIL":
                    return None
                name = "email_id" if item["id"].upper() == b"EMAILID" else "thread_id"
                fields[name] = None if value is None else value.decode()[:255]
        if not fields["uid"] or fields["uid"] in metas:
            return None
        metas[fields["uid"]] = MessageMeta(**fields)
    return metas


def _read_metas_parsed(data: list[Any]) -> dict[int, MessageMeta]:
    return {
        uid: MessageMeta(
            uid=uid,
            size=int(item.get(b"RFC822.SIZE", 0)),
            internal_date=_aware(item.get(b"INTERNALDATE")),
            flags=_flags(item),
            email_id=_email_id(item),
            thread_id=_thread_id(item),
            labels=_labels(item),
        )
        for uid, item in parse_fetch_response(data, False, True).items()
    }


def _internal_date(text: bytes) -> datetime | None:
    found = _INTERNALDATE.fullmatch(text)
    month = _MONTHS.get(found[2].lower()) if found else None
    if found is None or month is None:
        return None
    day, _, year, hour, minute, second, sign, zone_hours, zone_minutes = found.groups()
    offset = timedelta(hours=int(zone_hours), minutes=int(zone_minutes))
    try:
        stated = datetime(
            int(year), month, int(day), int(hour), int(minute), int(second), tzinfo=UTC
        )
    except ValueError:
        return None
    return stated - offset if sign == b"+" else stated + offset


def read_bodies(data: list[Any]) -> dict[int, bytes]:
    """A body FETCH's answers (`fetch_bodies`) by UID: read by regular expressions when
    every one is a UID and BODY[] alone, else by imapclient's parser; tests hold the two
    equal."""
    fast = _read_bodies_fast(data)
    return _read_bodies_parsed(data) if fast is None else fast


def _read_bodies_fast(data: list[Any]) -> dict[int, bytes] | None:
    """imaplib holds each answer as (its line up to the literal, the literal) and the
    rest of its line: the UID comes before BODY[] or after it."""
    bodies: dict[int, bytes] = {}
    answers = iter(data)
    for head in answers:
        tail = next(answers, None)
        opened = (
            _BODY_HEAD.fullmatch(head[0]) if isinstance(head, tuple) and len(head) == 2 else None
        )
        closed = _BODY_TAIL.fullmatch(tail) if isinstance(tail, bytes) else None
        if opened is None or closed is None or (opened[1] is None) == (closed[1] is None):
            return None
        bodies[int(opened[1] or closed[1])] = bytes(head[1])  # a repeat: the last, as imapclient
    return bodies


def _read_bodies_parsed(data: list[Any]) -> dict[int, bytes]:
    fetched = parse_fetch_response(data, False, True)
    return {uid: bytes(item[b"BODY[]"]) for uid, item in fetched.items() if b"BODY[]" in item}


def _uid_set(uids: Iterable[int]) -> bytes:
    """The UIDs as a sequence set of ranges ("1:200,205"): a first sync's batch is a
    few bytes, not 200 numbers."""
    ranges = to_ranges(uids)
    return ",".join(f"{a}" if a == b else f"{a}:{b}" for a, b in ranges).encode()


def _email_id(data: Mapping[bytes, Any]) -> str | None:
    return _object_id(data.get(b"EMAILID", data.get(b"X-GM-MSGID")))


def _thread_id(data: Mapping[bytes, Any]) -> str | None:
    return _object_id(data.get(b"THREADID", data.get(b"X-GM-THRID")))


def _object_id(value: Any) -> str | None:
    if isinstance(value, tuple | list):  # EMAILID (M6d99ac3275bb4e)
        value = value[0] if value else None
    # THREADID NIL: a server that does not thread (RFC 8474).
    return None if value is None else _decoded(value)[:255]


def _labels(data: Mapping[bytes, Any]) -> list[str] | None:
    """X-GM-LABELS as text: system labels (`\\Inbox`, `\\Sent`) as sent, the others
    folder names in modified UTF-7 (`&XfJT0ZAB-` is 已发送). None when not sent."""
    value = data.get(b"X-GM-LABELS")
    if value is None:
        return None
    if not isinstance(value, tuple | list):
        value = (value,)
    return [_label(label if isinstance(label, bytes) else str(label).encode()) for label in value]


def _label(text: bytes) -> str:
    if text.startswith(b"\\"):
        return _decoded(text)
    try:
        return str(imap_utf7.decode(text))
    except (UnicodeError, ValueError):  # not modified UTF-7 after all: as sent
        return _decoded(text)


_ESEARCH_ALL = re.compile(rb"\bALL ([0-9:,]+)", re.IGNORECASE)


def _sequence_set(text: bytes) -> UidRanges:
    """The ranges of an IMAP sequence set ("1:3,7"), merged and ascending, within
    1..MAX_UID; "*" and nonsense are left out. Never expanded: a hostile server's
    "1:4294967295" is one range, not four billion numbers."""
    ranges = []
    for part in text.strip(b"()").split(b","):
        low, _, high = part.partition(b":")
        if not low.isdigit() or (high and not high.isdigit()):
            continue
        first, last = sorted((int(low), int(high or low)))
        if first <= MAX_UID and last >= 1:
            ranges.append((max(first, 1), min(last, MAX_UID)))
    return merge_ranges(ranges)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> UidRanges:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _decoded(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
