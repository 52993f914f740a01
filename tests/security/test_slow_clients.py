"""Slow clients are cut off (issue 31: a connection that sent nothing, or its headers or
body a byte every 2 s, stayed open: six tried for 90 s, all still open). A real uvicorn
with the protocol of backend/serving.py and short limits; each client is bounded by a
socket timeout far above them, so a connection kept open fails the test instead of
hanging it."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest

from tests.support.api import auth_headers
from tests.support.uvicorn import RunningApi, running_api

LIMIT_SECONDS = 3
TRICKLE_SECONDS = 2
BOUND_SECONDS = 30  # far above the limits: only a connection never closed reaches it


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    with running_api(
        tmp_path_factory.mktemp("api"),
        options=("--timeout-keep-alive", "2"),
        SCHEDULER_MODE="local",
        REQUEST_HEADER_TIMEOUT_SECONDS=str(LIMIT_SECONDS),
        REQUEST_BODY_TIMEOUT_SECONDS=str(LIMIT_SECONDS),
    ) as running:
        yield running


def connect(server: RunningApi) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=BOUND_SECONDS)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a socket timeout (the server kept
    the connection) fails the test."""
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def trickle(sock: socket.socket, data: bytes) -> int:
    """Sends `data` a byte every TRICKLE_SECONDS until the server answers or closes;
    returns how many bytes went out."""
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        readable, _, _ = select.select([sock], [], [], TRICKLE_SECONDS)
        if readable:
            return sent + 1
    return len(data)


def test_a_connection_that_sends_nothing_is_closed(server: RunningApi) -> None:
    with connect(server) as sock:
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer


def test_headers_sent_a_byte_at_a_time_are_cut_off(server: RunningApi) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: mailbeat\r\nUser-Agent: slowloris\r\n\r\n"
    with connect(server) as sock:
        sent = trickle(sock, head)
        answer = read_to_end(sock)
    assert sent < len(head) // 4, sent  # cut off long before the headers were complete
    assert answer.startswith(b"HTTP/1.1 408"), answer


def test_a_body_sent_a_byte_at_a_time_is_cut_off(server: RunningApi) -> None:
    body = b'{"email": "slow@example.org", "imap_host": "imap.example.org"}'
    token = auth_headers()["Authorization"]
    head = (
        f"POST /accounts HTTP/1.1\r\nHost: mailbeat\r\nAuthorization: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head)
        sent = trickle(sock, body)
        answer = read_to_end(sock)
    assert sent < len(body) // 4, sent
    assert answer == b"", answer  # closed: the app saw the client go, and answered nothing


def test_an_idle_kept_alive_connection_is_closed(server: RunningApi) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: mailbeat\r\n\r\n")
        answer = read_to_end(sock)
    # One answer, then the connection closed by the server (--timeout-keep-alive).
    assert answer.startswith(b"HTTP/1.1 "), answer
    assert answer.count(b"HTTP/1.1 ") == 1
