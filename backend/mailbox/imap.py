"""The one place IMAP connections are built: TLS mode, trusted CAs, timeouts, login.

Every failure leaves this module as an `ImapError` whose `kind` says how the poller
should treat it: "auth" (wait for new credentials or the end of the backoff),
"connection" (retry with backoff), "protocol" (the server said no, or spoke nonsense).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, Literal

from imapclient import IMAPClient, SocketTimeout
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from backend.config import get_settings
from backend.errors import MailbeatError
from backend.models import Account

ErrorKind = Literal["auth", "connection", "protocol", "internal"]
Stage = Literal["dns", "connect", "tls", "auth", "folder"]

DEFAULT_PORTS = {"ssl": 993, "starttls": 143, "none": 143}


class ImapError(MailbeatError):
    status_code = 502
    kind: ErrorKind = "protocol"
    stage: Stage = "folder"


class ImapAuthError(ImapError):
    kind: ErrorKind = "auth"
    stage: Stage = "auth"


class ImapConnectionError(ImapError):
    kind: ErrorKind = "connection"
    stage: Stage = "connect"


class ImapDnsError(ImapConnectionError):
    stage: Stage = "dns"


class ImapTlsError(ImapConnectionError):
    stage: Stage = "tls"


class ImapProtocolError(ImapError):
    kind: ErrorKind = "protocol"
    stage: Stage = "folder"


def ssl_context() -> ssl.SSLContext:
    """Verifying context: the system's CAs plus IMAP_CA_BUNDLE (a private CA)."""
    context = ssl.create_default_context()
    bundle = get_settings().imap_ca_bundle
    if bundle is not None:
        context.load_verify_locations(cafile=str(bundle))
    return context


def translate(exc: BaseException, *, stage: Stage = "folder") -> ImapError:
    """Map what imapclient, ssl and socket raise to one of our kinds."""
    if isinstance(exc, ImapError):
        return exc
    if isinstance(exc, LoginError):
        return ImapAuthError(f"authentication failed: {_text(exc)}")
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
    if isinstance(exc, IMAPClientAbortError | OSError | EOFError):
        error = ImapConnectionError(f"connection failed ({network_stage}): {_text(exc)}")
        error.stage = network_stage
        return error
    if isinstance(exc, IMAPClientError):
        error = ImapProtocolError(f"server refused ({stage}): {_text(exc)}")
        error.stage = stage
        return error
    raise exc


def _text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # imaplib quotes the server's bytes: b'[AUTHENTICATIONFAILED] ...'
    return text[:500]


def connect(
    host: str,
    port: int | None,
    security: str,
    *,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> IMAPClient:
    """An unauthenticated connection; TLS (implicit or STARTTLS) is verified."""
    settings = get_settings()
    timeout = SocketTimeout(
        connect=connect_timeout or settings.imap_connect_timeout,
        read=read_timeout or settings.imap_read_timeout,
    )
    port = port or DEFAULT_PORTS.get(security, 993)
    stage: Stage = "dns"
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        stage = "connect"
        if security == "ssl":
            stage = "tls"  # the handshake is part of connecting on an implicit-TLS port
            client = IMAPClient(
                host, port=port, ssl=True, ssl_context=ssl_context(), timeout=timeout
            )
        else:
            client = IMAPClient(host, port=port, ssl=False, timeout=timeout)
            if security == "starttls":
                stage = "tls"
                client.starttls(ssl_context())
    except (IMAPClientError, OSError, EOFError) as exc:
        raise translate(exc, stage=stage) from exc
    # Aware datetimes from INTERNALDATE (imapclient otherwise converts to naive local time).
    client.normalise_times = False
    # imapclient turns imaplib's debug output up to 5, and imaplib then formats the repr
    # of every response, message bodies included, whether or not anything is logged:
    # that costs more than parsing the messages.
    client._imap.debug = 0
    return client


def login(client: IMAPClient, account: Account, credentials: dict[str, Any]) -> None:
    try:
        if account.auth_method == "oauth2":
            client.oauth2_login(account.username, str(credentials["access_token"]))
        else:
            client.login(account.username, str(credentials["password"]))
    except (IMAPClientError, OSError, EOFError) as exc:
        raise translate(exc, stage="auth") from exc
    except KeyError as exc:
        raise ImapAuthError(f"the stored credentials lack {exc.args[0]!r}") from exc


def open_account(
    account: Account,
    *,
    credentials: Callable[[bool], dict[str, Any]],
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
) -> IMAPClient:
    """Connect and log in. `credentials(force_refresh)` gives the secrets; an XOAUTH2
    login that fails is retried once with a freshly refreshed access token, since
    providers revoke tokens before their stated expiry."""
    client = connect(
        account.imap_host,
        account.imap_port,
        account.imap_security,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    try:
        try:
            login(client, account, credentials(False))
        except ImapAuthError:
            if account.auth_method != "oauth2":
                raise
            # A failed AUTHENTICATE leaves the connection unauthenticated: try again on it.
            login(client, account, credentials(True))
    except BaseException:
        close(client)
        raise
    return client


def close(client: IMAPClient) -> None:
    """Log out politely; a connection that is already broken is just shut."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()
