"""Helpers for the storage tests."""

from __future__ import annotations

from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Account
from tests.support.s3 import MotoS3


class Outage:
    """Stops the moto server; `end()` (or the test's end) brings it back with the bucket,
    empty: moto keeps nothing across a restart."""

    def __init__(self, server: MotoS3, bucket: str) -> None:
        self.server = server
        self.bucket = bucket
        self.down = False

    def begin(self) -> None:
        self.server.stop()
        self.down = True

    def end(self) -> None:
        if self.down:
            self.server.start()
            self.server.create_bucket(self.bucket)
            self.down = False


def make_account(db: Session, n: int = 1) -> Account:
    account = Account(
        email=f"a{n}@example.test",
        imap_host="imap.example.test",
        imap_port=993,
        username=f"user{n}",
        credentials_encrypted=crypto.encrypt_json({"password": "p"}),
    )
    db.add(account)
    db.flush()
    return account
