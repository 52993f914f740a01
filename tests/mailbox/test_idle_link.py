"""IdleLink against the real Dovecot fixture: what it makes of the untagged responses
that say the selected folder is gone (backend/push/watcher.py selects it again)."""

from __future__ import annotations

import selectors

from backend.mailbox import credentials, imap
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.wait import wait_for


def idling(mail_account: MailAccount) -> imap.IdleLink:
    account = mail_account()
    session = imap.open_account(account, credentials=credentials.loader(account))
    link = session.idle(session.select("INBOX"))
    wait_for(lambda: read(link) or link.state == "idling", "IDLE started")
    return link


def read(link: imap.IdleLink) -> bool:
    """Whatever the server has sent within a moment; True when it was news."""
    with selectors.DefaultSelector() as selector:
        selector.register(link, selectors.EVENT_READ)
        return bool(selector.select(0.2)) and link.read()


def holding(link: imap.IdleLink, messages: int) -> bool:
    read(link)
    return link.exists == messages


def expunge(dovecot: Dovecot, username: str, uid: int) -> None:
    with dovecot.client(username) as client:
        client.select_folder("INBOX")
        client.delete_messages([uid])
        client.uid_expunge([uid])
        client.logout()


def test_the_last_message_expunged_asks_for_the_folder_again_and_one_of_several_does_not(
    dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username = mail_user[0]
    first, second = dovecot.append_many(username, [generated(1), generated(2)])
    link = idling(mail_account)
    assert (link.folder, link.exists, link.reselect) == ("INBOX", 2, None)
    try:
        expunge(dovecot, username, first)
        wait_for(lambda: holding(link, 1), "the first EXPUNGE")
        assert link.reselect is None  # a message deleted: the folder is still the one

        third = dovecot.append(username, generated(3))
        wait_for(lambda: holding(link, 2), "the EXISTS")
        expunge(dovecot, username, second)
        expunge(dovecot, username, third)
        wait_for(lambda: holding(link, 0), "every message expunged")
        assert link.reselect == "every message expunged"
    finally:
        link.end()
        link.close()
