from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot


@dataclass
class Inbox:
    """A Dovecot mailbox, accounts on it; webhooks go to the receiver."""

    dovecot: Dovecot
    username: str
    password: str
    account: MailAccount

    def append(self, *raws: bytes) -> None:
        self.dovecot.append_many(self.username, list(raws))


@pytest.fixture
def inbox(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    webhooks_on: Callable[..., None],
) -> Inbox:
    return Inbox(dovecot, mail_user[0], mail_user[1], mail_account)
