"""A proxy in front of the Dovecot fixture that enforces a provider's rule: the real
server answers everything, and the rule may answer a command in its place.

    def netease(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"ID "):
            state["identified"] = True
        elif command.upper().startswith((b"SELECT", b"EXAMINE")) and "identified" not in state:
            return tag + b" NO SELECT Unsafe Login.\\r\\n"
        return None  # forwarded to Dovecot
    with ImapProxy(dovecot.host, dovecot.imap_port, netease) as proxy: ...

The client's side is read a line at a time (mailbeat sends no literals; an AUTHENTICATE
continuation is a line of its own and is forwarded like any other); the server's side is
copied as it comes. `state` is per connection; an answer that is a BYE hangs up.

A fake may also change what passes: `up` rewrites a command line before it is forwarded,
`down` each of the server's responses, whole (a line with its literals), e.g. to add a
capability or answer FETCH items the server does not know (tests/mailbox/test_gmail.py).
`open` and `most` count the client connections open now and the most open at once (a
connection is out from its LOGOUT, or its end without one).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

Rule = Callable[[dict[str, object], bytes, bytes], bytes | None]
Rewrite = Callable[[dict[str, object], bytes], bytes]
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n$")


def _no_rule(state: dict[str, object], tag: bytes, command: bytes) -> bytes | None:
    return None


class ImapProxy:
    def __init__(
        self,
        host: str,
        port: int,
        rule: Rule = _no_rule,
        *,
        up: Rewrite | None = None,
        down: Rewrite | None = None,
    ) -> None:
        self.upstream = (host, port)
        self.rule = rule
        self.up, self.down = up, down
        self.commands: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        # Client connections open now, and the most ever open at once.
        self.open = 0
        self.most = 0
        self._count = threading.Lock()

    def __enter__(self) -> ImapProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        # close() alone leaves the port listening while _accept is blocked in accept():
        # the kernel's socket lives on until that call returns, and the next client would
        # still be proxied. shutdown() wakes accept() with an error.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():  # accepted as the proxy was closing
                client.close()
                return
            with self._count:
                self.open += 1
                self.most = max(self.most, self.open)
            server = socket.create_connection(self.upstream, timeout=30)
            # The timeout is for connecting: a link in IDLE is quiet for as long as it likes.
            server.settimeout(None)
            self._sockets += [client, server]
            write = threading.Lock()
            state: dict[str, object] = {}
            threading.Thread(
                target=self._down, args=(server, client, write, state), daemon=True
            ).start()
            threading.Thread(
                target=self._up, args=(client, server, write, state), daemon=True
            ).start()

    def _down(
        self,
        server: socket.socket,
        client: socket.socket,
        write: threading.Lock,
        state: dict[str, object],
    ) -> None:
        with contextlib.suppress(OSError):
            if self.down is None:
                while data := server.recv(65536):
                    with write:
                        client.sendall(data)
            else:
                with server.makefile("rb") as lines:
                    for response in _responses(lines):
                        with write:
                            client.sendall(self.down(state, response))
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def _up(
        self,
        client: socket.socket,
        server: socket.socket,
        write: threading.Lock,
        state: dict[str, object],
    ) -> None:
        counted = True
        with contextlib.suppress(OSError), client.makefile("rb") as lines:
            while line := lines.readline():
                tag, _, command = line.rstrip(b"\r\n").partition(b" ")
                self.commands.append(command)
                if counted and command.upper() == b"LOGOUT":
                    # The client is done: it waits for this answer before it lets go of
                    # the connection, so it is counted out before it does.
                    counted = False
                    self._leave()
                answer = self.rule(state, tag, command)
                if answer is None:
                    server.sendall(line if self.up is None else self.up(state, line))
                else:
                    with write:
                        client.sendall(answer)
                    if answer.startswith(b"* BYE"):  # as a server does, it hangs up
                        break
        for sock in (server, client):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if counted:
            self._leave()

    def _leave(self) -> None:
        with self._count:
            self.open -= 1


def _responses(lines: Any) -> Iterator[bytes]:
    """The server's responses, each a line with its literals and their continuations."""
    while line := lines.readline():
        response = line
        while (literal := _LITERAL.search(line)) is not None:
            response += lines.read(int(literal.group(1)))
            line = lines.readline()
            response += line
        yield response
