"""The held session's STATUS link (backend/mailbox/imap.StatusLink) on the Dovecot
fixture, driven by a selector as the watcher drives it; and what a check compares
(backend/push/service.Baseline)."""

from __future__ import annotations

import selectors

from backend.mailbox import imap
from backend.mailbox.imap import FolderStatus
from backend.push.service import Baseline
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.wait import wait_for


def _answer(link: imap.StatusLink) -> dict[str, FolderStatus]:
    found: list[dict[str, FolderStatus]] = []
    with selectors.DefaultSelector() as selector:
        selector.register(link, selectors.EVENT_READ)

        def answered() -> bool:
            for _key, _events in selector.select(0.5):
                statuses = link.read()
                if statuses is not None:
                    found.append(statuses)
            return bool(found)

        wait_for(answered, "the STATUS answers")
    return found[0]


def test_a_status_link_answers_as_status_does_and_sees_new_mail(
    dovecot: Dovecot, mail_user: tuple[str, str], mail_account: MailAccount
) -> None:
    username, password = mail_user
    dovecot.create_folder(username, "Archive")
    dovecot.append_many(username, [generated(1), generated(2)])
    account = mail_account()
    # Not closed as a session: the link owns the connection from now on.
    session = imap.open_account(account, credentials=lambda _refresh: {"password": password})
    expected = {folder: session.status(folder) for folder in ("INBOX", "Archive")}
    link = session.status_link(["INBOX", "Archive"])
    try:
        link.ask()
        assert link.busy and link.waiting_since is not None
        assert _answer(link) == expected
        assert not link.busy and link.waiting_since is None
        assert expected["INBOX"].highestmodseq is not None  # Dovecot has CONDSTORE

        dovecot.append(username, generated(3))
        link.ask()
        again = _answer(link)
        assert again["INBOX"].uidnext == expected["INBOX"].uidnext + 1
        assert again["Archive"] == expected["Archive"]
    finally:
        link.end()
        link.close()


def test_a_baseline_is_unchanged_only_when_every_folder_is_as_the_last_poll_saw_it() -> None:
    status = FolderStatus(uidvalidity=7, uidnext=5, messages=4, highestmodseq=12)
    untracked = Baseline({"INBOX": (7, 5)}, None)
    assert untracked.unchanged({"INBOX": status})
    assert not untracked.unchanged({"INBOX": FolderStatus(7, 6, 5, 13)})  # new mail
    assert not untracked.unchanged({"INBOX": FolderStatus(8, 5, 4, 12)})  # renumbered
    assert not untracked.unchanged({"Archive": status})  # never polled

    tracked = Baseline({"INBOX": (7, 5)}, {"INBOX": (7, 12)})
    assert tracked.unchanged({"INBOX": status})
    assert not tracked.unchanged({"INBOX": FolderStatus(7, 5, 4, 13)})  # a flag changed
    # Without CONDSTORE only a poll sees flag changes.
    assert not tracked.unchanged({"INBOX": FolderStatus(7, 5, 4, None)})
