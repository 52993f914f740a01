"""Poison messages: one that keeps failing processing is quarantined while the others of
its batch are handed on, listed (API, CLI, metrics), and replayed after a fix: handed on
once, never twice to a receiver that had it. Handed on alone it is quarantined too, once
other mailboxes' messages go through; an outage, every message failing, quarantines
nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend import crypto
from backend.models import Message, WebhookDelivery, utcnow
from backend.processing import handlers, progress, quarantine, service
from backend.processing.service import hand_on
from tests.console.test_commands import cli, cli_json
from tests.support.accounts import make_account
from tests.support.receiver import Receiver
from tests.support.webhooks import store_message

FAILURES = 3  # MAX_PROCESS_FAILURES here: fewer rounds, the same rule


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch, webhooks_on: Callable[..., None]) -> Iterator[set[int]]:
    """A step that fails for the message ids in the returned set (empty it: the fix);
    webhooks to the receiver, in-process; metrics read afresh at each scrape."""
    webhooks_on(METRICS_CACHE_SECONDS=0)
    monkeypatch.setattr(service, "MAX_PROCESS_FAILURES", FAILURES)
    bad: set[int] = set()

    def picky(session: Session, message: Message) -> None:
        if message.id in bad:
            raise ValueError(f"no CRM contact for {message.from_addr}")

    handlers.register(handlers.Handler("picky", picky))
    yield bad
    handlers.unregister("picky")


def _quarantine(ids: list[int]) -> None:
    """The batch's task and its retries, until the poison message is set aside; between
    two attempts other workers process other mailboxes' messages (what they record, not
    their messages: this file's tests are about the list and the replay)."""
    for _ in range(FAILURES - 1):
        with pytest.raises(service.ProcessingFailed):
            service.process_and_send_batch(ids)
        progress.succeeded()
    service.process_and_send_batch(ids)  # the last failure: quarantined, not retried


def _delivered(receiver: Receiver) -> list[int]:
    return sorted(r.json()["data"]["message"]["id"] for r in receiver.delivered())


def test_a_poison_message_is_quarantined_listed_and_replayed_once_after_a_fix(
    db: Session,
    api: TestClient,
    receiver: Receiver,
    poison: set[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    account = make_account(db)
    messages = [store_message(db, account, uid) for uid in range(1, 6)]
    bad = messages[2]
    poison.add(bad.id)
    ids = [m.id for m in messages]

    _quarantine(ids)

    others = [m.id for m in messages if m is not bad]
    assert _delivered(receiver) == others  # the rest of its batch flowed
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None and row.processed_at is None and row.quarantined_at is not None
    assert row.process_failures == FAILURES
    # The sweep leaves it, however old.
    db.execute(update(Message).values(ingested_at=utcnow() - timedelta(hours=1)))
    db.commit()
    assert service.sweep()["messages"] == 0

    # Listed: in the account's messages, in the admin list, in the CLI, in the metrics.
    listed = api.get(f"/accounts/{account.id}/messages", params={"quarantined": "true"}).json()
    assert listed["total"] == 1
    [item] = listed["items"]
    assert (item["id"], item["process_failures"]) == (bad.id, FAILURES)
    assert item["process_error"] == "ValueError: no CRM contact for Zoë Sender <zoe@example.org>"
    assert item["quarantined_at"] is not None and item["process_failed_at"] is not None
    assert api.get(f"/accounts/{account.id}/messages").json()["total"] == 5
    everywhere = api.get("/admin/quarantine").json()
    assert [m["id"] for m in everywhere["items"]] == [bad.id]
    assert api.get("/admin/quarantine", params={"account_id": account.id}).json()["total"] == 1
    assert cli_json(capsys, "messages", "quarantined")["items"][0]["id"] == bad.id
    code, out, _ = cli(capsys, "messages", "quarantined", "--account", str(account.id))
    assert code == 0 and out.startswith("1 quarantined messages") and "no CRM contact" in out
    assert f"mailbeat_messages_quarantined {float(1)}" in api.get("/metrics").text

    # The fix; one replay hands it on, once.
    poison.clear()
    replayed = api.post(f"/messages/{bad.id}/replay")
    assert replayed.status_code == 202, replayed.text
    assert replayed.json() == {"replayed": 1, "message_ids": [bad.id]}
    assert _delivered(receiver) == ids
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None and row.processed_at is not None
    assert (row.quarantined_at, row.process_failures) == (None, 0)
    assert api.get("/admin/quarantine").json()["total"] == 0
    assert f"mailbeat_messages_quarantined {float(0)}" in api.get("/metrics").text

    # A second replay: not quarantined any more, nothing sent.
    again = api.post(f"/messages/{bad.id}/replay")
    assert again.status_code == 409
    assert again.json()["detail"] == f"message {bad.id} is not quarantined: it was processed"
    code, _, err = cli(capsys, "messages", "replay", str(bad.id))
    assert code == 1 and "not quarantined" in err
    assert _delivered(receiver) == ids


def test_a_replay_sends_nothing_to_a_receiver_that_had_the_message(
    db: Session, api: TestClient, receiver: Receiver, webhooks_on: Callable[..., None]
) -> None:
    own = Receiver(secret="account-secret")
    own.up()
    try:
        account = make_account(db)
        message = store_message(db, account, 1)
        hand_on([message.id])  # delivered to the global receiver only
        assert _delivered(receiver) == [message.id]
        # The account gains a receiver of its own; the message is quarantined again (its
        # processed state lost, as after a restore of the messages table alone).
        account.webhook_url = own.url
        account.webhook_secret_encrypted = crypto.encrypt("account-secret")
        db.execute(
            update(Message)
            .where(Message.id == message.id)
            .values(processed_at=None, quarantined_at=utcnow(), process_failures=10)
        )
        db.commit()

        for _ in range(2):  # two replays racing: the second finds nothing to release
            assert api.post(f"/accounts/{account.id}/quarantine/replay").status_code == 202

        # The global receiver had it: not sent again. The new one gets it once.
        assert _delivered(receiver) == [message.id]
        assert [r.json()["data"]["message"]["id"] for r in own.delivered()] == [message.id]
        db.expire_all()
        targets = db.scalars(
            select(WebhookDelivery.target).where(WebhookDelivery.message_id == message.id)
        )
        assert sorted(targets) == ["account", "global"]
    finally:
        own.down()


def test_replay_by_account_and_for_all(
    db: Session,
    api: TestClient,
    receiver: Receiver,
    poison: set[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = make_account(db), make_account(db)
    batches = [[store_message(db, account, uid) for uid in (1, 2)] for account in (first, second)]
    for good, bad in batches:
        poison.add(bad.id)
        _quarantine([good.id, bad.id])
    assert api.get("/admin/quarantine").json()["total"] == 2
    poison.clear()
    # Stored, not processed yet, not quarantined: a replay leaves it to its own task.
    store_message(db, first, 3)

    done = api.post(f"/accounts/{first.id}/quarantine/replay").json()
    assert done == {"replayed": 1, "message_ids": [batches[0][1].id]}
    assert api.get("/admin/quarantine").json()["total"] == 1
    assert cli_json(capsys, "messages", "replay", "--all") == {
        "replayed": 1,
        "message_ids": [batches[1][1].id],
    }
    assert api.post("/admin/quarantine/replay").json() == {"replayed": 0, "message_ids": []}
    assert _delivered(receiver) == sorted(m.id for batch in batches for m in batch)

    # What the operator gets wrong is named.
    missing = api.post("/accounts/2147483647/quarantine/replay")
    assert (missing.status_code, missing.json()["detail"]) == (
        404,
        "account 2147483647 does not exist",
    )
    assert api.post("/messages/9223372036854775807/replay").status_code == 404
    assert api.get("/admin/quarantine", params={"quarantined": "1"}).status_code == 422
    code, _, err = cli(capsys, "messages", "replay", "--all", "--account", str(first.id))
    assert code == 1 and "one of them" in err


def test_a_message_still_failing_after_its_replay_is_quarantined_again(
    db: Session, receiver: Receiver, poison: set[int]
) -> None:
    account = make_account(db)
    good, bad = store_message(db, account, 1), store_message(db, account, 2)
    poison.add(bad.id)
    _quarantine([good.id, bad.id])
    db.expire_all()
    first = db.get(Message, bad.id)
    assert first is not None and first.quarantined_at is not None

    # Replayed without the fix, beside a message that goes through: it counts from zero.
    other = store_message(db, account, 3)
    assert quarantine.release(db, message_id=bad.id) == [bad.id]
    db.commit()
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None and (row.quarantined_at, row.process_failures) == (None, 0)
    _quarantine([other.id, bad.id])
    db.expire_all()
    row = db.get(Message, bad.id)
    assert row is not None and row.quarantined_at is not None
    assert row.process_failures == FAILURES
    assert _delivered(receiver) == [good.id, other.id]


@pytest.fixture
def crm(monkeypatch: pytest.MonkeyPatch, webhooks_on: Callable[..., None]) -> Iterator[set[str]]:
    """A step whose service every message needs: down while the returned set holds
    "down" (empty it: the service is back)."""
    monkeypatch.setattr(service, "MAX_PROCESS_FAILURES", FAILURES)
    state: set[str] = set()

    def lookup(session: Session, message: Message) -> None:
        if "down" in state:
            raise ConnectionError("CRM at crm.example.org does not answer")

    handlers.register(handlers.Handler("crm", lookup))
    yield state
    handlers.unregister("crm")


def _failures(db: Session, *messages: Message) -> list[tuple[int, bool]]:
    """Each message's counted failures and whether it is quarantined."""
    db.expire_all()
    rows = [db.get(Message, m.id) for m in messages]
    return [(r.process_failures, r.quarantined_at is not None) for r in rows if r is not None]


def _age(db: Session) -> None:
    """Every message old enough for the sweep."""
    db.execute(update(Message).values(ingested_at=utcnow() - timedelta(hours=1)))
    db.commit()


def test_a_poison_message_handed_on_alone_is_quarantined_while_other_mailboxes_flow(
    db: Session, receiver: Receiver, poison: set[int]
) -> None:
    """A mailbox whose only traffic is the poison message: a batch of one, then the sweep
    alone. What tells it from an outage is another mailbox's messages going through,
    processed by another worker process (this one forgets its own successes: it knows
    them through Redis only)."""
    quiet, busy = make_account(db), make_account(db)
    bad = store_message(db, quiet, 1)
    poison.add(bad.id)
    _age(db)

    # Its task and retries, alone, with nothing processed anywhere meanwhile: nothing
    # tells it from an outage, and nothing is counted.
    for _ in range(FAILURES + 1):
        with pytest.raises(service.ProcessingFailed):
            service.process_and_send_batch([bad.id])
    assert _failures(db, bad) == [(0, False)]
    db.expire_all()
    assert db.get(Message, bad.id).process_failed_at is not None  # type: ignore[union-attr]

    # The other mailbox's messages flow between the sweep's attempts at it.
    others = []
    for uid in range(1, FAILURES + 1):
        other = store_message(db, busy, uid)
        hand_on([other.id])
        others.append(other.id)
        progress.forget()
        assert service.sweep()["messages"] == 1  # the poison message, alone
        assert _failures(db, bad) == [(uid, uid == FAILURES)]

    assert service.sweep()["messages"] == 0  # quarantined: the sweep leaves it
    assert _delivered(receiver) == others


def test_an_outage_quarantines_nothing_and_everything_flows_once_it_ends(
    db: Session, receiver: Receiver, crm: set[str]
) -> None:
    """The service every message needs is down: batches of several, batches of one, a
    batch retried whose other message went through before the outage, attempted three
    times the quarantine's count; nothing is quarantined."""
    first, second = make_account(db), make_account(db)
    before = store_message(db, first, 1)
    early = store_message(db, second, 1)  # ingested before the last success
    hand_on([before.id])
    crm.add("down")
    during = [store_message(db, first, 2), *(store_message(db, second, uid) for uid in (2, 3))]

    for _ in range(3 * FAILURES):
        for batch in ([before, during[0]], [early, *during[1:]], [during[2]]):
            with pytest.raises(service.ProcessingFailed):
                service.process_and_send_batch([m.id for m in batch])

    # Nothing is quarantined; only the first failure of the message ingested before the
    # outage's last success counted.
    assert _failures(db, early, *during) == [(1, False), (0, False), (0, False), (0, False)]
    db.expire_all()
    row = db.get(Message, during[0].id)
    assert row is not None and row.process_error is not None
    assert row.process_error.startswith("ConnectionError: CRM at crm.example.org")

    # The service is back: the sweep hands every one on, once.
    crm.clear()
    _age(db)
    assert service.sweep()["messages"] == 4
    assert _delivered(receiver) == sorted(m.id for m in (before, early, *during))
    assert service.sweep()["messages"] == 0
