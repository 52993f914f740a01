"""Folders whose names differ only in characters a key could flatten ('/', ' ', '_',
Cyrillic), with one UIDVALIDITY: each message keeps its own object."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox.service import poll_account
from backend.models import Message
from backend.storage import service as storage
from backend.storage.base import message_key
from tests.support.accounts import make_account
from tests.support.dovecot import Dovecot

LOOK_ALIKES = ["a/b", "a_b", "Sent Items", "Sent_Items", "Архив", "Отчет", "a%2Fb", ".."]


@pytest.fixture(scope="module")
def fs_dovecot() -> Iterator[Dovecot]:
    """A Dovecot whose folders have a '/' separator, as Gmail's and Exchange's do."""
    root = Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-fs-"))
    server = Dovecot(root, mail_location="maildir:~/Maildir:LAYOUT=fs")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_look_alike_folders_with_one_uidvalidity_keep_their_own_objects(
    db: Session, fs_dovecot: Dovecot, s3_bucket: str
) -> None:
    folders = [name for name in LOOK_ALIKES if name != ".."]  # Dovecot refuses '..'
    account = make_account(db, fs_dovecot, username="lookalike", folders=folders)
    raws = {}
    for folder in folders:
        raws[folder] = f"Subject: in {folder}\r\n\r\nThis is {folder}.\r\n".encode()
        fs_dovecot.append("lookalike", raws[folder], folder=folder)
        fs_dovecot.set_uidvalidity("lookalike", folder, 4242)

    assert poll_account(account.id).outcome == "success"

    rows = list(db.scalars(select(Message).where(Message.account_id == account.id)))
    assert sorted(row.folder for row in rows) == sorted(folders)
    assert {(row.uidvalidity, row.uid) for row in rows} == {(4242, 1)}
    assert len({row.storage_key for row in rows}) == len(folders)
    for row in rows:
        assert row.storage_key is not None and row.storage_backend == "s3"
        assert storage.get_object(row.storage_backend, row.storage_key) == raws[row.folder]


def test_message_keys_are_injective_and_path_safe() -> None:
    keys = [message_key(1, folder, 7, 1) for folder in LOOK_ALIKES]
    long_names = ["x" * 300 + "a", "x" * 300 + "b"]
    keys += [message_key(1, folder, 7, 1) for folder in long_names]
    assert len(set(keys)) == len(keys)
    for key in keys:
        parts = key.split("/")
        assert len(parts) == 5 and ".." not in parts and "." not in parts, key
        assert len(key.encode()) < 1024  # S3's limit
