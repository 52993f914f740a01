"""Every list pages by id: `after` (the previous page's `next_after`) or `offset`, with
its filter, and a clear 422 for paging parameters it cannot take. Real PostgreSQL and
Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from backend.models import (
    Account,
    AccountStatus,
    DeliveryStatus,
    DeliveryTarget,
    EventType,
    Message,
    PollOutcome,
    PollRun,
    WebhookDelivery,
)
from backend.schedules import service as schedules
from backend.schedules import store
from tests.support.accounts import make_accounts
from tests.support.api import account_payload, auth_headers, make_client
from tests.support.net import free_port
from tests.support.redis_db import RedisDb


def walk(api: TestClient, path: str, limit: int, **params: Any) -> tuple[list[int], list[Any]]:
    """Every page from the first by following `next_after`: the ids and each page's
    `total`."""
    ids: list[int] = []
    totals: list[Any] = []
    after = None
    for _ in range(100):
        query = {"limit": limit, **params, **({} if after is None else {"after": after})}
        response = api.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [item.get("id", item.get("account_id")) for item in body["items"]]
        totals.append(body["total"])
        after = body["next_after"]
        if after is None:
            return ids, totals
        assert after == ids[-1]
    raise AssertionError("next_after never ran out")


def by_offset(api: TestClient, path: str, limit: int, **params: Any) -> list[int]:
    ids: list[int] = []
    offset = 0
    while True:
        body = api.get(path, params={"limit": limit, "offset": offset, **params}).json()
        if not body["items"]:
            return ids
        ids += [item.get("id", item.get("account_id")) for item in body["items"]]
        offset += limit


def statuses(db: Session, count: int) -> list[Account]:
    """`count` accounts; every third with status error, every fifth disabled."""
    accounts = make_accounts(db, count)
    for index, account in enumerate(accounts):
        if index % 5 == 4:
            account.enabled = False
            account.status = AccountStatus.DISABLED
        elif index % 3 == 0:
            account.status = AccountStatus.ERROR
    db.commit()
    return accounts


def test_accounts_page_by_cursor_and_offset_alike(api: TestClient, db: Session):
    accounts = statuses(db, 11)
    every = sorted(a.id for a in accounts)
    ids, totals = walk(api, "/accounts", 4)
    assert ids == every
    assert totals == [11, 11, 11]
    assert by_offset(api, "/accounts", 4) == every
    # A cursor and an offset together: the offset counts from the cursor.
    page = api.get("/accounts", params={"after": every[2], "offset": 3, "limit": 2}).json()
    assert [a["id"] for a in page["items"]] == every[6:8]
    assert page["next_after"] == every[7]
    # Past the end: nothing, and no next page.
    page = api.get("/accounts", params={"offset": 11}).json()
    assert page == {"items": [], "total": 11, "next_after": None}
    last = api.get("/accounts", params={"offset": 8, "limit": 3}).json()
    assert [a["id"] for a in last["items"]] == every[8:]
    assert last["next_after"] is None


def test_accounts_status_filter_pages(api: TestClient, db: Session):
    accounts = statuses(db, 13)
    errors = sorted(a.id for a in accounts if a.status == AccountStatus.ERROR)
    assert len(errors) == 4
    ids, totals = walk(api, "/accounts", 3, status="error")
    assert ids == errors
    assert set(totals) == {4}
    assert by_offset(api, "/accounts", 3, status="error") == errors
    page = api.get("/accounts", params={"status": "error", "offset": 2, "limit": 1}).json()
    assert [a["id"] for a in page["items"]] == [errors[2]]
    assert page["next_after"] == errors[2]


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"limit": 0}, "limit", "greater than or equal to 1"),
        ({"limit": 501}, "limit", "less than or equal to 500"),
        ({"offset": -1}, "offset", "greater than or equal to 0"),
        ({"after": -5}, "after", "greater than or equal to 0"),
        ({"after": "abc"}, "after", "valid integer"),
        ({"status": "sleepy"}, "status", "'active'"),
        ({"cursor": 5}, "cursor", "this route takes: after, limit, offset, status"),
    ],
)
def test_bad_paging_parameters_say_what_to_fix(
    api: TestClient, params: dict[str, Any], field: str, says: str
):
    response = api.get("/accounts", params=params)
    assert response.status_code == 422
    body = response.json()
    assert [problem["loc"] for problem in body["errors"]] == [["query", field]]
    assert says in body["detail"]


@pytest.mark.parametrize(
    "path",
    ["/admin/schedules", "/admin/dead-letters", "/accounts/1/messages", "/accounts/1/poll-runs"],
)
def test_every_list_refuses_a_negative_cursor(api: TestClient, path: str):
    response = api.get(path, params={"after": -1})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "after"]


def test_schedule_pages_read_only_scheduled_accounts(
    api: TestClient, db: Session, redis_db: RedisDb
):
    accounts = statuses(db, 10)
    assert api.post("/admin/email-worker/sync").json()["created"] == 8
    scheduled = sorted(a.id for a in accounts if a.enabled)
    ids, totals = walk(api, "/admin/schedules", 3)
    assert ids == scheduled
    assert set(totals) == {8}
    assert by_offset(api, "/admin/schedules", 3) == scheduled
    page = api.get("/admin/schedules", params={"after": scheduled[0], "limit": 2}).json()
    assert [(e["account_id"], e["name"], e["interval"]) for e in page["items"]] == [
        (scheduled[1], f"mailbox:{scheduled[1]}", 60),
        (scheduled[2], f"mailbox:{scheduled[2]}", 60),
    ]
    assert all(e["next_run_at"] is not None for e in page["items"])
    # An entry Redis lost is left out of its page until the next reconcile restores it,
    # and the total counts what Redis holds.
    store.delete(scheduled[1])
    page = api.get("/admin/schedules", params={"limit": 3}).json()
    assert [e["account_id"] for e in page["items"]] == [scheduled[0], scheduled[2]]
    assert page["total"] == 7
    assert page["next_after"] == scheduled[2]


def test_schedule_count_leaves_out_beats_static_entries(db: Session, redis_db: RedisDb):
    make_accounts(db, 3)
    db.commit()
    schedules.reconcile(db)
    client = redis_db.client()
    client.zadd("redbeat::schedule", {"redbeat:schedules.reconcile": 1.0})
    assert client.zcard("redbeat::schedule") == 4
    assert schedules.count_entries() == 3


def _messages(db: Session, account_id: int, count: int) -> list[int]:
    rows = [
        Message(account_id=account_id, folder="INBOX", uidvalidity=1, uid=uid, size=1)
        for uid in range(1, count + 1)
    ]
    db.add_all(rows)
    db.commit()
    return [row.id for row in rows]


def test_messages_page_newest_first(api: TestClient, db: Session):
    first, other = make_accounts(db, 2)
    db.commit()
    ids = _messages(db, first.id, 7)
    _messages(db, other.id, 3)
    newest_first = sorted(ids, reverse=True)
    path = f"/accounts/{first.id}/messages"
    walked, totals = walk(api, path, 3)
    assert walked == newest_first
    assert set(totals) == {7}
    assert by_offset(api, path, 3) == newest_first
    page = api.get(path, params={"after": newest_first[1], "offset": 1, "limit": 2}).json()
    assert [m["id"] for m in page["items"]] == newest_first[3:5]


def test_poll_runs_and_dead_letters_page_newest_first(api: TestClient, db: Session):
    first, other = make_accounts(db, 2)
    db.commit()
    runs = [PollRun(account_id=first.id, outcome=PollOutcome.SUCCESS) for _ in range(5)]
    runs.append(PollRun(account_id=other.id, outcome=PollOutcome.SUCCESS))
    letters = [
        WebhookDelivery(
            event_id=f"event-{n}",
            event_type=EventType.ACCOUNT_ERROR,
            dedupe_key=f"key-{n}",
            target=DeliveryTarget.GLOBAL,
            account_id=first.id if n % 2 else other.id,
            status=DeliveryStatus.DELIVERED if n == 3 else DeliveryStatus.DEAD,
        )
        for n in range(7)
    ]
    db.add_all([*runs, *letters])
    db.commit()
    run_ids = sorted((r.id for r in runs if r.account_id == first.id), reverse=True)
    walked, totals = walk(api, f"/accounts/{first.id}/poll-runs", 2)
    assert walked == run_ids
    assert set(totals) == {5}
    dead = sorted((d.id for d in letters if d.status == DeliveryStatus.DEAD), reverse=True)
    walked, totals = walk(api, "/admin/dead-letters", 4)
    assert walked == dead
    assert set(totals) == {6}
    dead_first = [
        d.id for d in letters if d.status == DeliveryStatus.DEAD and d.account_id == first.id
    ]
    walked, totals = walk(api, "/admin/dead-letters", 1, account_id=first.id)
    assert walked == sorted(dead_first, reverse=True)
    assert set(totals) == {2}
    assert by_offset(api, "/admin/dead-letters", 4) == dead


def test_local_schedule_pages_alike(set_env: Callable[..., None]):
    set_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SCHEDULER_MODE="local")
    with make_client(auth_headers()) as api:
        ids = [api.post("/accounts", json=account_payload()).json()["id"] for _ in range(5)]
        walked, totals = walk(api, "/admin/schedules", 2)
        assert walked == ids
        assert set(totals) == {5}
        assert by_offset(api, "/admin/schedules", 2) == ids
        page = api.get("/admin/schedules", params={"after": ids[0], "offset": 1}).json()
        assert [e["account_id"] for e in page["items"]] == ids[2:]
        assert page["mode"] == "local"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/accounts", {}),
        ("/accounts", {"status": "active"}),
        ("/admin/schedules", {}),
        ("/admin/dead-letters", {}),
        ("/accounts/1/messages", {}),
        ("/accounts/1/poll-runs", {}),
    ],
)
def test_a_cursor_past_every_id_is_an_empty_or_full_page(
    api: TestClient, db: Session, path: str, params: dict[str, Any]
):
    # Account ids are 32-bit and message ids 64-bit: any cursor up to the largest 64-bit
    # id is a place in the list (past its end, or before its start newest first).
    make_accounts(db, 1)
    for after in (2**31, 2**63 - 1):
        response = api.get(path, params={"after": after, **params})
        assert response.status_code == 200, response.text
        assert response.json()["next_after"] is None
