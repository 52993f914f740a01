"""News that comes while another poll holds the mailbox, after that poll has looked, is
polled once the holder lets go (real Dovecot, Redis and PostgreSQL)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from backend.celery_app import queue_keys
from backend.mailbox import polling
from backend.mailbox.polling import LOCKED, run_poll
from backend.mailbox.service import PollResult, poll_account
from backend.schedules.store import POLL_QUEUE, POLL_TASK
from tests.support.accounts import MailAccount
from tests.support.dovecot import Dovecot
from tests.support.mail import generated
from tests.support.redis_db import RedisDb


def _queued_polls(redis_db: RedisDb) -> list[int]:
    """The accounts of the polls waiting in the email queue (no worker takes them)."""
    client = redis_db.client()
    polls = []
    for key in queue_keys(POLL_QUEUE):
        for body in client.lrange(key, 0, -1):
            headers = json.loads(body)["headers"]
            if headers["task"] == POLL_TASK:
                polls.append(json.loads(headers["argsrepr"])[0])
    return polls


def test_news_while_a_poll_holds_the_mailbox_is_polled_once_it_lets_go(
    dovecot: Dovecot,
    mail_user: tuple[str, str],
    mail_account: MailAccount,
    redis_db: RedisDb,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    account = mail_account()
    looked, go_on = threading.Event(), threading.Event()

    def looked_then_held(*args: Any, **kwargs: Any) -> PollResult:
        result = poll_account(*args, **kwargs)
        looked.set()  # the holder has looked, and still holds the mailbox
        assert go_on.wait(60)
        return result

    monkeypatch.setattr(polling, "poll_account", looked_then_held)
    holder = threading.Thread(target=run_poll, args=(account.id, "holder"))
    holder.start()
    try:
        assert looked.wait(60)
        dovecot.append(mail_user[0], generated(1))
        assert run_poll(account.id, "news") == LOCKED
        assert _queued_polls(redis_db) == []  # nothing is sent while the holder holds it
    finally:
        go_on.set()
        holder.join(60)
    assert not holder.is_alive()
    assert _queued_polls(redis_db) == [account.id]  # one more, as the holder let go

    monkeypatch.setattr(polling, "poll_account", poll_account)
    rerun = run_poll(account.id, "rerun")
    assert isinstance(rerun, PollResult) and rerun.messages == 1
    assert _queued_polls(redis_db) == [account.id]  # a poll nobody contended asks nothing
