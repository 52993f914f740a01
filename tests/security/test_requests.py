"""Requests before the app reads them: the token first, then a bounded body (real
uvicorn, since what matters is what the server reads off the socket); the API docs
follow API_DOCS_PUBLIC."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.support.api import account_payload, auth_headers, make_client
from tests.support.uvicorn import RunningApi, running_api

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    with running_api(tmp_path_factory.mktemp("api"), SCHEDULER_MODE="local") as running:
        yield running


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def read_answer(sock: socket.socket) -> bytes:
    """The whole answer: its head and the Content-Length bytes of body after it."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, body = answer.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def raw_request(server: RunningApi, head: str) -> tuple[socket.socket, bytes]:
    """Sends only the request's head; returns the socket and the answer."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(head.encode())
    return sock, read_answer(sock)


def test_the_token_is_checked_before_a_byte_of_the_body_is_read(server: RunningApi) -> None:
    # 100 MB announced, none sent: the answer comes from the headers alone (the old
    # code waited for the whole body, and read it into memory, before its 401).
    sock, answer = raw_request(
        server,
        "POST /accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {100 * MiB}\r\n\r\n",
    )
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "Unauthorized"


def test_an_unauthenticated_100_mb_post_does_not_grow_the_api(server: RunningApi) -> None:
    before = rss_kib(server.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(
            b"POST /accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {100 * MiB}\r\n\r\n".encode()
        )
        chunk = b"x" * MiB
        try:
            for _ in range(100):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: it does not take the rest
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    # Before: +294 MB. Now whatever sits in socket buffers at most.
    assert rss_kib(server.pid) - before < 20 * 1024


def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"email": "'
    sent = 0
    while sent < total:
        yield b"a" * size
        sent += size
    yield b'"}'


def test_a_body_over_the_limit_is_a_413_with_or_without_content_length(
    server: RunningApi,
) -> None:
    with httpx.Client(base_url=server.url, headers=auth_headers(), timeout=30) as client:
        declared = client.post(
            "/accounts",
            content=b"{" + b" " * (2 * MiB) + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert declared.status_code == 413
        assert declared.json() == {
            "error": "PayloadTooLarge",
            "detail": "the request body is larger than 1048576 bytes (MAX_REQUEST_BODY_BYTES)",
        }
        before = rss_kib(server.pid)
        # Chunked: no Content-Length to go by, the bytes are counted as they come.
        streamed = client.post(
            "/accounts", content=chunked(50 * MiB), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["error"] == "PayloadTooLarge"
        assert rss_kib(server.pid) - before < 20 * 1024
        # Under the limit, a body is read as before.
        created = client.post("/accounts", json=account_payload())
        assert created.status_code == 201, created.text


def test_the_body_limit_is_a_setting(set_env: Callable[..., None]) -> None:
    set_env(MAX_REQUEST_BODY_BYTES=100)
    with make_client(auth_headers()) as api:
        response = api.post("/accounts", json=account_payload())
        assert response.status_code == 413
        assert "100 bytes" in response.json()["detail"]


DOCS = ("/docs", "/redoc", "/openapi.json")


def test_docs_are_public_in_development(anonymous: TestClient) -> None:
    for path in DOCS:
        assert anonymous.get(path).status_code == 200, path


def test_docs_need_the_token_in_production(set_env: Callable[..., None]) -> None:
    set_env(ENVIRONMENT="production")
    with make_client({}) as anonymous:
        for path in DOCS:
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert "paths" not in response.text
        assert anonymous.get("/health").status_code in (200, 503)
        assert anonymous.get("/metrics").status_code == 200
    with make_client(auth_headers()) as api:
        assert api.get("/openapi.json").json()["info"]["title"] == "mailbeat"
    set_env(API_DOCS_PUBLIC="true")
    with make_client({}) as anonymous:
        assert anonymous.get("/openapi.json").status_code == 200
