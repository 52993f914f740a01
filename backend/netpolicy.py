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

from backend import redaction
from backend.config import get_settings
from backend.errors import MailbeatError

# httpx logs each request's URL, a webhook's basic-auth password included.
redaction.install(redaction.CLIENT_LOGGERS)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# (what it is, the test), in the order a reason is given: the most specific first.
_KINDS: tuple[tuple[str, str], ...] = (
    ("unspecified", "is_unspecified"),
    ("loopback", "is_loopback"),
    ("link-local", "is_link_local"),
    ("site-local", "is_site_local"),  # fec0::/10: deprecated, and not global
    ("multicast", "is_multicast"),
    ("private", "is_private"),
    ("reserved", "is_reserved"),
)
# Not global but in none of the groups above (100.64.0.0/10, shared address space).
_NOT_GLOBAL = "non-public"
# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it: NAT64's
# well-known prefix (RFC 6052) and the deprecated IPv4-compatible addresses (::a.b.c.d).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


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


def embedded_ipv4(address: IpAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to: IPv4-mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d), 6to4 (2002:aabb:ccdd::/48), NAT64 (64:ff9b::a.b.c.d) and
    Teredo's client (2001::/32). A packet to any of them can end at that IPv4 address (a
    host's own 6to4 relay or NAT64 gateway forwards it), so it is judged by its rules."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _own_kind(address: IpAddress) -> str | None:
    for kind, test in _KINDS:
        if getattr(address, test, False):  # IPv4 addresses have no is_site_local
            return kind
    return None if address.is_global else _NOT_GLOBAL


def _kind(address: IpAddress) -> str | None:
    """The kind of address that makes `address` refused ("loopback"), or None. An IPv6
    form that embeds an IPv4 address is refused when that address is; the forms that
    only carry it (mapped, compatible, 6to4, NAT64) are otherwise judged as that
    address, while Teredo stays judged as IPv6 (2001::/32 is not global)."""
    inner = embedded_ipv4(address)
    if inner is None:
        return _own_kind(address)
    inner_kind = _own_kind(inner)
    if inner_kind is not None:
        return inner_kind
    if isinstance(address, ipaddress.IPv6Address) and address.teredo is not None:
        return _own_kind(address)
    return None


def refusal(address: IpAddress, host: str | None = None) -> str | None:
    """Why the policy refuses to connect to `address` (resolved from `host`), or None."""
    if get_settings().private_networks_allowed:
        return None
    hosts, networks = _allowlist()
    if host is not None and host.lower().rstrip(".") in hosts:
        return None
    inner = embedded_ipv4(address)
    if any(address in network or (inner is not None and inner in network) for network in networks):
        return None
    kind = _kind(address)
    if kind is None:
        return None
    what = (
        f"{address} embeds {inner}, a {kind}"
        if inner is not None and _own_kind(inner) is not None
        else f"{address} is a {kind}"
    )
    return (
        f"{what} address, refused by the outbound policy "
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


def split_userinfo(url: str) -> tuple[str, str | None]:
    """(the URL with `user:password@` replaced by `***@`, the userinfo as written), or
    (the URL, None) when it has none. The userinfo is basic auth for a receiver: a
    secret, kept encrypted apart from the rest of the URL."""
    parts = urlsplit(url)
    userinfo, at, host_port = parts.netloc.rpartition("@")
    if not at:
        return url, None
    return urlunsplit(parts._replace(netloc=f"***@{host_port}")), userinfo


def with_userinfo(url: str, userinfo: str | None) -> str:
    """The URL with its userinfo (a `***` placeholder or none) set to `userinfo`."""
    if userinfo is None:
        return url
    parts = urlsplit(url)
    host_port = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host_port}"))


def redact_userinfo(url: str) -> str:
    """The URL without `user:password@`, for responses and logs."""
    return split_userinfo(url)[0]


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
