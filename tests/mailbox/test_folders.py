"""Folders by special use (RFC 6154) and `*`, looked up in the server's LIST: against the
Dovecot fixture, whose Sent, Junk, Trash and Drafts carry their special uses (and the
Cyrus fixture, which gives them theirs at CREATE)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.mailbox import folders
from backend.mailbox.folders import Listed, resolve
from backend.mailbox.service import poll_account
from backend.models import Message
from tests.support.accounts import MailAccount
from tests.support.api import account_payload, auth_headers
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.servers import RealServer, on_both_servers

FOLDERS = ["INBOX", "Sent", "Junk", "Trash", "Archive", "已发送"]


def stored_folders(db: Session, account_id: int) -> set[str]:
    db.expire_all()
    return set(db.scalars(select(Message.folder).where(Message.account_id == account_id)))


def fill(server: RealServer, username: str) -> None:
    for index, folder in enumerate(FOLDERS):
        server.append(username, generated(index), server.folder(folder))


@on_both_servers
def test_special_uses_and_every_folder_are_found_in_the_list(
    db: Session,
    mail_server: RealServer,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(FOLDER_LIST_SECONDS=0)  # every poll lists again
    username, _ = mail_user
    fill(mail_server, username)
    named = mail_server.folder  # Cyrus's are below INBOX: INBOX.Sent

    account = mail_account(folders=["\\Sent"])
    assert poll_account(account.id).messages == 1
    assert stored_folders(db, account.id) == {named("Sent")}

    account.folders = ["*"]
    db.commit()
    assert poll_account(account.id).messages == 3
    assert stored_folders(db, account.id) == {
        named(folder) for folder in ("INBOX", "Sent", "Archive", "已发送")
    }

    # A folder created later is polled by the next poll; junk only when named.
    mail_server.append(username, generated(10), named("Later"))
    assert poll_account(account.id).messages == 1
    assert named("Later") in stored_folders(db, account.id)
    account.folders = ["*", "\\junk"]
    db.commit()
    assert poll_account(account.id).messages == 1
    assert stored_folders(db, account.id) == {
        named(folder) for folder in [*FOLDERS, "Later"] if folder != "Trash"
    }


def test_the_list_is_kept_for_folder_list_seconds(
    db: Session,
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    set_env: Callable[..., None],
) -> None:
    set_env(FOLDER_LIST_SECONDS=3600)
    folders.clear()
    username, _ = mail_user
    fill(dovecot, username)
    account = mail_account(folders=["*"])
    assert poll_account(account.id).messages == 4

    dovecot.append(username, generated(10), "Later")
    assert poll_account(account.id).messages == 0  # the kept LIST does not have it yet
    folders.clear()
    assert poll_account(account.id).messages == 1


def test_a_special_use_the_server_lacks_means_no_folder() -> None:
    listing = [
        Listed("INBOX", frozenset()),
        Listed("[Gmail]/All Mail", frozenset({"\\all", "\\haschildren"})),
        Listed("[Gmail]", frozenset({"\\noselect"})),
        Listed("[Gmail]/Spam", frozenset({"\\junk"})),
    ]
    assert resolve(["\\Drafts"], listing) == []
    assert resolve(["\\Inbox", "\\All"], listing) == ["INBOX", "[Gmail]/All Mail"]
    assert resolve(["*"], listing) == ["INBOX", "[Gmail]/All Mail"]
    assert resolve(["INBOX", "*"], listing) == ["INBOX", "[Gmail]/All Mail"]
    assert folders.watched(["*", "\\Inbox", "\\Sent"]) == ("INBOX", "\\Sent")


def test_the_api_takes_special_uses_in_any_case_and_refuses_unknown_ones(
    api: TestClient,
) -> None:
    created = api.post(
        "/accounts", json=account_payload(folders=["\\sent", "*"]), headers=auth_headers()
    )
    assert created.status_code == 201, created.text
    assert created.json()["folders"] == ["\\sent", "*"]
    refused = api.post(
        "/accounts", json=account_payload(folders=["\\Spam"]), headers=auth_headers()
    )
    assert refused.status_code == 422
    assert "no special use" in refused.text and "\\\\Junk" in refused.text


class _Server:
    def list_folders(self) -> list[Listed]:
        return [Listed("INBOX", frozenset()), Listed("Sent Items", frozenset({"\\sent"}))]


def test_push_watches_a_special_use_as_the_folder_that_has_it() -> None:
    assert folders.one("\\sent", _Server()) == "Sent Items"
    assert folders.one("\\Drafts", _Server()) is None
    assert folders.one("Archive", _Server()) == "Archive"  # a name needs no LIST
