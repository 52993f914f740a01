"""What the Dovecot and Cyrus fixtures share: a user's IMAP session, APPEND, CREATE and
STATUS, as a mail client does them."""

from __future__ import annotations

import ssl as ssl_lib
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from imapclient import IMAPClient


class MailServer:
    host: str
    imap_port: int
    imaps_port: int
    cert_path: Path
    passwords: dict[str, str]

    def folder(self, name: str) -> str:
        """A folder as this server spells it (the Cyrus fixture's live below INBOX)."""
        return name

    @staticmethod
    def takes(raw: bytes) -> bool:
        """Whether APPEND takes the message: Dovecot stores any bytes (Cyrus does not)."""
        return True

    def client(self, username: str, *, ssl: bool = False) -> IMAPClient:
        if ssl:
            context = ssl_lib.create_default_context(cafile=str(self.cert_path))
            client = IMAPClient(
                self.host, port=self.imaps_port, ssl=True, ssl_context=context, timeout=30
            )
        else:
            client = IMAPClient(self.host, port=self.imap_port, ssl=False, timeout=30)
        client.login(username, self.passwords[username])
        return client

    def append(
        self,
        username: str,
        raw: bytes,
        folder: str = "INBOX",
        *,
        flags: Iterable[str] = (),
        when: datetime | None = None,
    ) -> int:
        """APPEND one message; returns its UID."""
        return self.append_many(username, [raw], folder, flags=flags, when=when)[0]

    def append_many(
        self,
        username: str,
        raws: Iterable[bytes],
        folder: str = "INBOX",
        *,
        flags: Iterable[str] = (),
        when: datetime | None = None,
    ) -> list[int]:
        uids: list[int] = []
        with self.client(username) as client:
            if folder.upper() != "INBOX" and not client.folder_exists(folder):
                self._create(client, folder)
            for raw in raws:
                response = client.append(folder, raw, flags=tuple(flags), msg_time=when)
                # APPENDUID: b'[APPENDUID <uidvalidity> <uid>] Append completed.'
                text = response.decode() if isinstance(response, bytes) else str(response)
                uids.append(int(text.split("APPENDUID", 1)[1].split()[1].rstrip("]")))
            client.logout()
        return uids

    def create_folder(self, username: str, folder: str) -> None:
        with self.client(username) as client:
            self._create(client, folder)
            client.logout()

    @staticmethod
    def _create(client: IMAPClient, folder: str) -> None:
        client.create_folder(folder)

    def delete_folder(self, username: str, folder: str) -> None:
        with self.client(username) as client:
            client.delete_folder(folder)
            client.logout()

    def folder_status(self, username: str, folder: str = "INBOX") -> dict[bytes, int]:
        with self.client(username) as client:
            status: dict[bytes, int] = client.folder_status(
                folder, [b"MESSAGES", b"UIDVALIDITY", b"UIDNEXT"]
            )
            client.logout()
        return status
