"""The test suite's fake IMAP server: a small socket server on loopback whose answers a
test scripts. For what Dovecot will not do: hang, stall after the greeting, answer
nonsense. One thread per connection.

    with FakeImapServer(greeting=None) as server:        # accepts, never says a word
        ...  # an account on 127.0.0.1:server.port, security "none"

    def respond(tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"LOGIN"):
            return tag + b" NO [AUTHENTICATIONFAILED] nope\\r\\n"
        return None  # say nothing: the client waits for its read timeout
    with FakeImapServer(respond=respond) as server: ...
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType

GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake test server ready\r\n"

# (tag, command without its tag and line end) -> the bytes to send back, or None to say
# nothing and keep the connection open.
Respond = Callable[[bytes, bytes], bytes | None]


def silent(_tag: bytes, _command: bytes) -> bytes | None:
    return None


class FakeImapServer:
    def __init__(self, *, greeting: bytes | None = GREETING, respond: Respond = silent) -> None:
        self.greeting = greeting
        self.respond = respond
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.commands: list[bytes] = []  # every command received, in order (tag removed)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> FakeImapServer:
        self.listener.settimeout(0.2)
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=10)
        self.listener.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with self._lock:
                self._connections.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if self.greeting is not None:
                conn.sendall(self.greeting)
            lines = conn.makefile("rb")
            while not self._stop.is_set():
                line = lines.readline()
                if not line:
                    return
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                with self._lock:
                    self.commands.append(command)
                answer = self.respond(tag, command)
                if answer is not None:
                    conn.sendall(answer)
