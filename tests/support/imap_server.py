"""The test suite's fake IMAP server: a small socket server on loopback that misbehaves
on purpose, for what Dovecot will not do. One thread per connection.

It speaks just enough IMAP4rev1 for mailbeat's poll (LOGIN, STATUS, EXAMINE,
UID SEARCH, UID FETCH, NOOP, CLOSE, LOGOUT), and can be told to: announce a body
literal far above the message's RFC822.SIZE, trickle a body a byte at a time, report
UIDs beyond RFC 3501's 32 bits, never greet (`greeting=None`), greet and then say
nothing (`answer=False`), or answer any command as a test scripts it (`respond`).

    with FakeImapServer([FakeMessage(1, raw), FakeMessage(2, raw, literal=10**9)]) as server:
        ...  # an account on 127.0.0.1:server.port, security "none"

    def respond(tag: bytes, command: bytes) -> bytes | None:
        if command.upper().startswith(b"LOGIN"):
            return tag + b" NO [AUTHENTICATIONFAILED] no\r\n"
        return None  # the built-in answer
    with FakeImapServer(respond=respond) as server: ...
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

UIDVALIDITY = 7
CHUNK = 64 * 1024
GREETING = b"* OK [CAPABILITY IMAP4rev1] hostile test server ready\r\n"

# (tag, command without its tag and line end) -> the bytes to answer with, or None for
# the built-in answer.
Respond = Callable[[bytes, bytes], bytes | None]


@dataclass
class FakeMessage:
    uid: int
    raw: bytes
    # The literal's announced size when it is not len(raw): the server then sends that
    # many bytes (zeros after the message) as fast as the client reads.
    literal: int | None = None
    # Seconds between the bytes of the body: a trickle.
    trickle: float = 0.0


class FakeImapServer:
    def __init__(
        self,
        messages: Sequence[FakeMessage] = (),
        *,
        search_extra: Sequence[int] = (),
        greeting: bytes | None = GREETING,
        answer: bool = True,
        respond: Respond | None = None,
    ) -> None:
        self.messages = {message.uid: message for message in messages}
        self.uidvalidity = UIDVALIDITY  # a test may change it: the folder renumbered
        self.greeting = greeting  # None: accept connections and never say a word
        self.answer = answer  # False: greet, then answer nothing (a hung server)
        self.respond = respond
        self.commands: list[bytes] = []  # every command received, tag removed
        # UIDs SEARCH reports beyond the messages (absurd ones, for instance).
        self.search_extra = list(search_extra)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.connections: list[socket.socket] = []
        self.body_bytes_sent = 0
        self.disconnects = 0

    def __enter__(self) -> FakeImapServer:
        self.listener.settimeout(0.2)
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop.set()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self.threads:
            thread.join(timeout=10)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            file = conn.makefile("rb")
            if self.greeting is not None:
                conn.sendall(self.greeting)
            while not self.stop.is_set():
                line = file.readline()
                if not line:
                    return
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                self.commands.append(rest)
                scripted = self.respond(tag, rest) if self.respond is not None else None
                command = rest.upper()
                if scripted is not None:
                    conn.sendall(scripted)
                elif not self.answer:
                    continue
                elif command.startswith(b"CAPABILITY"):
                    conn.sendall(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
                elif command.startswith(b"LOGIN"):
                    conn.sendall(tag + b" OK logged in\r\n")
                elif command.startswith((b"EXAMINE", b"SELECT")):
                    conn.sendall(
                        b"* %d EXISTS\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT %d] ok\r\n"
                        b"* FLAGS ()\r\n%s OK [READ-ONLY] examined\r\n"
                        % (len(self.messages), self.uidvalidity, self._uidnext(), tag)
                    )
                elif command.startswith(b"STATUS"):
                    counts = (len(self.messages), self._uidnext(), self.uidvalidity)
                    conn.sendall(
                        b"* STATUS INBOX (MESSAGES %d UIDNEXT %d UIDVALIDITY %d)\r\n" % counts
                        + tag
                        + b" OK status\r\n"
                    )
                elif command.startswith(b"UID SEARCH"):
                    uids = sorted(self.messages) + self.search_extra
                    found = b" ".join(str(uid).encode() for uid in uids)
                    conn.sendall(b"* SEARCH " + found + b"\r\n" + tag + b" OK searched\r\n")
                elif command.startswith(b"UID FETCH"):
                    self._fetch(conn, tag, command)
                elif command.startswith(b"LOGOUT"):
                    conn.sendall(b"* BYE bye\r\n" + tag + b" OK logged out\r\n")
                    return
                else:
                    conn.sendall(tag + b" OK\r\n")
        except OSError:
            return
        finally:
            self.disconnects += 1
            conn.close()

    def _uidnext(self) -> int:
        return max(self.messages, default=0) + 1

    def _fetch(self, conn: socket.socket, tag: bytes, command: bytes) -> None:
        wanted = _uid_set(command.split(b" ")[2])
        bodies = b"BODY" in command.split(b" ", 3)[3]
        for seq, uid in enumerate(sorted(self.messages), start=1):
            if uid not in wanted:
                continue
            message = self.messages[uid]
            if not bodies:
                conn.sendall(
                    b'* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE "23-Nov-2026 10:00:00 +0000"'
                    b" FLAGS ())\r\n" % (seq, uid, len(message.raw))
                )
                continue
            size = message.literal if message.literal is not None else len(message.raw)
            conn.sendall(b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (seq, uid, size))
            self._send_body(conn, message, size)
            conn.sendall(b")\r\n")
        conn.sendall(tag + b" OK fetched\r\n")

    def _send_body(self, conn: socket.socket, message: FakeMessage, size: int) -> None:
        body = message.raw[:size]
        if message.trickle:
            for index in range(len(body)):
                if self.stop.is_set():
                    return
                conn.sendall(body[index : index + 1])
                self.body_bytes_sent += 1
                time.sleep(message.trickle)
            return
        conn.sendall(body)
        self.body_bytes_sent += len(body)
        left = size - len(body)
        zeros = b"0" * CHUNK
        while left > 0 and not self.stop.is_set():
            part = zeros[: min(CHUNK, left)]
            conn.sendall(part)
            self.body_bytes_sent += len(part)
            left -= len(part)


def _uid_set(text: bytes) -> set[int]:
    uids: set[int] = set()
    for part in text.split(b","):
        if re.fullmatch(rb"\d+:\d+", part):
            low, high = (int(x) for x in part.split(b":"))
            uids.update(range(min(low, high), max(low, high) + 1))
        elif part.isdigit():
            uids.add(int(part))
    return uids
