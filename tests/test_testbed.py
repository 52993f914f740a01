"""Each fixture of the test bed does what later tests rely on."""

from __future__ import annotations

import ssl

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.support.dovecot import Dovecot
from tests.support.redis_db import RedisDb
from tests.support.s3 import MotoS3


def test_dovecot_plain_and_tls(dovecot: Dovecot, mail_user: tuple[str, str]) -> None:
    username, password = mail_user
    uid = dovecot.append(username, b"Subject: hello\r\n\r\nbody\r\n")
    assert uid == 1
    with dovecot.client(username, ssl=True) as client:
        info = client.select_folder("INBOX", readonly=True)
        assert info[b"EXISTS"] == 1
        client.logout()
    # The generated certificate is not trusted by default.
    with pytest.raises(ssl.SSLError):
        IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, timeout=5)
    with (
        IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=5) as client,
        pytest.raises(LoginError),
    ):
        client.login(username, password + "-wrong")


def test_dovecot_uidvalidity_reset_keeps_the_mail(
    dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [b"Subject: 1\r\n\r\na\r\n", b"Subject: 2\r\n\r\nb\r\n"])
    before = dovecot.folder_status(username)
    dovecot.reset_uidvalidity(username)
    after = dovecot.folder_status(username)
    assert after[b"UIDVALIDITY"] != before[b"UIDVALIDITY"]
    assert after[b"MESSAGES"] == 2


def test_dovecot_maildir_drop(dovecot: Dovecot, mail_user: tuple[str, str]) -> None:
    username, _ = mail_user
    dovecot.write_maildir(username, [b"Subject: x\r\n\r\ny\r\n"] * 3, folder="Archive")
    assert dovecot.folder_status(username, "Archive")[b"MESSAGES"] == 3


def test_redis_index_is_private(redis_db: RedisDb) -> None:
    assert redis_db.index is not None and redis_db.index > 0
    client = redis_db.client()
    assert client.dbsize() == 0
    client.set("probe", "1")
    assert client.get("probe") == b"1"


def test_moto_s3_server(moto_s3: MotoS3, s3_bucket: str) -> None:
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="a/b", Body=b"data")
    assert client.get_object(Bucket=s3_bucket, Key="a/b")["Body"].read() == b"data"
