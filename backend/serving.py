"""uvicorn's HTTP protocol with deadlines for slow clients: `--http
backend.serving:BoundedHttpProtocol` on every command that serves the API.

uvicorn closes an idle kept-alive connection (`--timeout-keep-alive`, 5 s) but sets no
limit on a connection that sends nothing at all, or its headers or body a byte at a
time: six such clients held connections open for 90 s and more (issue 31), and enough of
them exhaust file descriptors. Here the headers must all arrive within
REQUEST_HEADER_TIMEOUT_SECONDS of the connection opening (or of a kept-alive request's
first byte), and the body within REQUEST_BODY_TIMEOUT_SECONDS of the headers; a
connection that misses either is closed. The application's own time, and the
response's, are not bounded here.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backend.config import get_settings

log = logging.getLogger(__name__)

# uvicorn's option naming this protocol, for every command that serves the API.
PROTOCOL = "backend.serving:BoundedHttpProtocol"

_TIMEOUT_TEXT = b"the request headers did not arrive in time\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_TIMEOUT_TEXT)).encode() + b"\r\n"
    b"connection: close\r\n"
    b"\r\n" + _TIMEOUT_TEXT
)


class BoundedHttpProtocol(HttpToolsProtocol):
    """httptools' protocol (uvicorn's default where httptools is installed, as
    uvicorn[standard] does) plus one timer per connection: the phase it bounds is either
    the headers or the body."""

    _deadline: asyncio.TimerHandle | None = None
    _in_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:  # a kept-alive connection's next request
            self._await_headers()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._in_headers = False
        self._arm(get_settings().request_body_timeout_seconds)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._in_headers = True
        self._arm(get_settings().request_header_timeout_seconds)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        phase = "headers" if self._in_headers else "body"
        log.info("closing a connection whose request %s did not arrive in time", phase)
        if self._in_headers:
            # No response has started: the client may be told why.
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
