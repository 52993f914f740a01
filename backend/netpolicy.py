"""Where mailbeat may connect to: the IMAP servers, webhook receivers and OAuth token
endpoints that API callers name.

Without a policy the service is a way into its own network: cloud metadata at
169.254.169.254, the database, Redis, anything listening on loopback. In production
(OUTBOUND_ALLOW_PRIVATE unset) loopback, link-local, private, multicast and reserved
addresses are refused unless OUTBOUND_ALLOWLIST names the host or its network.

The check runs on the addresses DNS gives, and the connection then goes to the address
that was checked, never to the name again: a name that resolves to a public address for
the check and to an internal one for the connection (DNS rebinding) gets nowhere. The
API also refuses literal addresses at once (`address_refusal`), so a mistake shows when
the account is saved rather than at its first poll. This module is the one place httpx
clients are built, so every outbound HTTP request goes through the check.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from backend.config import get_settings
from backend.errors import MailbeatError

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (what it is, the test), in the order a reason is given: the most specific first.
_KINDS: tuple[tuple[str, str], ...] = (
    ("unspecified", "is_unspecified"),
    ("loopback", "is_loopback"),
    ("link-local", "is_link_local"),
    ("multicast", "is_multicast"),
    ("private", "is_private"),
    ("reserved", "is_reserved"),
)
# Not global but in none of the groups above (100.64.0.0/10, shared address space).
_NOT_GLOBAL = "non-public"


class OutboundRefused(MailbeatError):
    """A destination the outbound policy refuses; the message says why and what to set."""

    status_code = 422


def _allowlist() -> tuple[set[str], list[Network]]:
    hosts: set[str] = set()
    networks: list[Network] = []
    for raw in get_settings().outbound_allowlist.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.rstrip("."))
    return hosts, networks


def _kind(address: IpAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for kind, test in _KINDS:
        if getattr(address, test):
            return kind
    return None if address.is_global else _NOT_GLOBAL


def refusal(address: IpAddress, host: str | None = None) -> str | None:
    """Why the policy refuses to connect to `address` (resolved from `host`), or None."""
    if get_settings().private_networks_allowed:
        return None
    hosts, networks = _allowlist()
    if host is not None and host.lower().rstrip(".") in hosts:
        return None
    if any(address in network for network in networks):
        return None
    kind = _kind(address)
    if kind is None:
        return None
    return (
        f"{address} is a {kind} address, refused by the outbound policy "
        "(name the host or its network in OUTBOUND_ALLOWLIST to allow it)"
    )


def literal_address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def address_refusal(host: str) -> str | None:
    """Checked when a host is saved: a literal address (or `localhost`) the policy
    refuses. Names are checked again, resolved, at every connection."""
    if host.lower().rstrip(".") == "localhost":
        address: IpAddress | None = ipaddress.ip_address("127.0.0.1")
    else:
        address = literal_address(host)
    return None if address is None else refusal(address, host)


def url_refusal(url: str, *, https: bool = False) -> str | None:
    """Why a URL saved through the API is refused, or None. `https`: the URL receives
    secrets (an OAuth refresh token), so outside development and test it must be https."""
    parts = urlsplit(url)
    if https and get_settings().production and parts.scheme != "https":
        return "must be an https URL outside development (it is sent secrets)"
    return address_refusal(parts.hostname or "")


def redact_userinfo(url: str) -> str:
    """The URL without `user:password@`, for responses and logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def checked_addresses(host: str, port: int) -> Iterator[tuple[Any, ...]]:
    """getaddrinfo's answers for (host, port) that the policy allows, in the resolver's
    order. Raises socket.gaierror when the name does not resolve, OutboundRefused when
    every address it resolves to is refused."""
    answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    reasons: list[str] = []
    allowed = []
    for family, kind, proto, _name, sockaddr in answers:
        reason = refusal(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]), host)
        if reason is None:
            allowed.append((family, kind, proto, sockaddr))
        else:
            reasons.append(reason)
    if not allowed:
        raise OutboundRefused(f"{host}: {reasons[0]}" if reasons else f"{host}: no address")
    yield from allowed


def connect(host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first checked address of `host` that answers."""
    error: OSError | None = None
    for family, kind, proto, sockaddr in checked_addresses(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    assert error is not None  # checked_addresses yields at least one address or raises
    raise error


class _CheckedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only to checked addresses. TLS still
    verifies the certificate against the URL's host name: httpcore takes that from the
    request, not from the address the socket was connected to."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        try:
            addresses = list(checked_addresses(host, port))
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}") from exc
        for *_, sockaddr in addresses:
            try:
                return super().connect_tcp(
                    sockaddr[0], port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error


def http_client(
    *,
    timeout: float,
    connect_timeout: float,
    headers: dict[str, str] | None = None,
    max_connections: int | None = 100,
    max_keepalive: int = 20,
) -> httpx.Client:
    """An httpx client whose every connection passes the policy. Redirects are not
    followed (the policy would have to be asked again, and a signed webhook body or a
    refresh token must not go where the operator did not send it); proxies from the
    environment are not used (they would connect in the policy's place). Connections are
    kept alive, up to `max_keepalive` idle ones; `max_connections` at once (None: no
    bound, the caller bounds its concurrency)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_keepalive)
    # No Nagle: a request's headers and body are separate writes, and the body would
    # wait for the receiver's delayed ACK of the headers (40 ms on Linux) on a kept-alive
    # connection.
    no_delay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = httpx.HTTPTransport(limits=limits, socket_options=no_delay)
    # httpx takes no network backend of its own; its pool is httpcore's, which does.
    transport._pool._network_backend = _CheckedBackend()
    return httpx.Client(
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        follow_redirects=False,
        trust_env=False,
        headers=headers,
    )
