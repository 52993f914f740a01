"""A real HTTP receiver on loopback that records what it is sent and can be told to fail.

It checks signatures as docs/webhooks.md tells receivers to, with the code from that page,
and answers 401 to a request whose signature does not verify.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.net import free_port

SECRET = "whsec-test-secret"
WEBHOOKS_DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"

Verify = Callable[..., bool]


@cache
def doc_verify() -> Verify:
    """The `verify` function of docs/webhooks.md's "Verifying" section, run as written."""
    section = WEBHOOKS_DOC.read_text().split("### Verifying", 1)[1].split("\n### ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    namespace: dict[str, Any] = {}
    exec(compile(code, str(WEBHOOKS_DOC), "exec"), namespace)
    verify: Verify = namespace["verify"]
    return verify


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0  # seconds before answering (to make the sender time out)


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]  # names lower-cased
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """`secret`: requests must carry a valid signature for it (else 401); None: unsigned
    requests are expected and nothing is checked. `keep_alive`: HTTP/1.1, a connection
    serves many requests (else HTTP/1.0, one request per connection)."""

    def __init__(
        self, secret: str | None = SECRET, *, port: int | None = None, keep_alive: bool = False
    ) -> None:
        self.port = port or free_port()
        self.secret = secret
        self.keep_alive = keep_alive
        self.requests: list[Received] = []
        self.holding = threading.Event()  # a held request is waiting (see hold_next)
        self._hold = False
        self._hold_all = False
        self.held = 0  # requests waiting for release() now
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most at once so far
        self._release = threading.Event()
        self._script: deque[Reply] = deque()
        self.default = Reply()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def reply(self, *replies: Reply) -> None:
        """Answer the next requests with these, then with `default` again."""
        with self._lock:
            self._script.extend(replies)

    def fail(self, times: int, status: int = 500) -> None:
        self.reply(*[Reply(status=status, body=b"receiver failing")] * times)

    def hold_next(self) -> None:
        """Keep the next request waiting, unanswered, until `release()`: a sender can be
        killed while its request is in flight. The request then counts as received."""
        with self._lock:
            self._hold = True
            self._release.clear()
            self.holding.clear()

    def hold_all(self) -> None:
        """Keep every request waiting, unanswered, until `release()`."""
        with self._lock:
            self._hold_all = True
            self._release.clear()

    def release(self) -> None:
        self._release.set()

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def event_ids(self) -> list[str]:
        return [r.headers["x-mailbeat-event-id"] for r in self.delivered()]

    def accepted(self) -> dict[str, int]:
        """Event id -> how often it was answered 2xx. A receiver keeps the ids it has
        processed and drops repeats (docs/webhooks.md, "Idempotency"): the keys are what
        it processed, a count above 1 a repeat it dropped."""
        counts: dict[str, int] = {}
        for event_id in self.event_ids():
            counts[event_id] = counts.get(event_id, 0) + 1
        return counts

    def _signature_ok(self, headers: dict[str, str], body: bytes) -> bool:
        if self.secret is None:
            return True
        return doc_verify()(
            self.secret,
            headers.get("x-mailbeat-timestamp", ""),
            body,
            headers.get("x-mailbeat-signature", ""),
        )

    def _wait_if_held(self) -> None:
        with self._lock:
            held, self._hold = self._hold or self._hold_all, False
            self.held += held
        if held:
            self.holding.set()
            self._release.wait(timeout=300)
            with self._lock:
                self.held -= 1
                self._hold_all = False

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"
            # As web servers do: an answer's headers and body are separate writes, and on
            # a kept-alive connection the body would wait 40 ms for the sender's delayed ACK.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                try:
                    self._answer()
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._wait_if_held()
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver._signature_ok(headers, body):
                    reply = receiver._next_reply()
                else:
                    reply = Reply(status=401, body=b"the signature does not verify")
                if reply.delay:
                    time.sleep(reply.delay)
                receiver._record(Received(headers, body, reply.status, time.monotonic()))
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    self.wfile.write(reply.body)
                except OSError:  # the sender gave up waiting
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: senders get connection refused."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
