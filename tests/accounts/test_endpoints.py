from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend import crypto
from backend.mailbox.service import poll_account
from backend.models import (
    Account,
    AccountCleanup,
    Attachment,
    FolderCursor,
    Message,
    PollRun,
    PushStatus,
    utcnow,
)
from backend.schedules import service as schedules
from backend.storage import service as storage
from backend.storage.base import account_prefix, message_key
from backend.storage.tasks import purge_deleted
from tests.support.accounts import make_account
from tests.support.api import account_payload, create_dovecot_account
from tests.support.dovecot import Dovecot
from tests.support.imap_server import FakeImapServer
from tests.support.net import free_port
from tests.support.redis_db import RedisDb
from tests.support.s3 import MotoS3


def entry_ids() -> set[int]:
    return {entry.account_id for entry in schedules.list_entries()}


def test_create_returns_the_account_with_its_state_and_schedules_it(api: TestClient):
    response = api.post("/accounts", json=account_payload(poll_interval_seconds=60))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "active"
    assert body["enabled"] is True
    assert body["auth_method"] == "password"
    assert body["poll_interval_seconds"] == 60
    assert body["folders"] == ["INBOX"]
    assert body["initial_sync"] == "all"
    for field in (
        "last_polled_at",
        "last_success_at",
        "last_error",
        "disabled_reason",
    ):
        assert body[field] is None
    assert body["consecutive_failures"] == 0
    assert body["message_count"] == 0
    assert body["id"] in entry_ids()


def test_create_defaults_and_lowercases_the_host(api: TestClient):
    payload = account_payload(imap_host="IMAP.Example.COM")
    del payload["folders"]
    body = api.post("/accounts", json=payload).json()
    assert body["imap_host"] == "imap.example.com"
    assert body["folders"] == ["INBOX"]
    assert body["poll_interval_seconds"] == 300
    assert body["imap_security"] == "ssl"
    assert body["track_changes"] is True


def test_change_tracking_is_turned_off_and_on_per_account(api: TestClient, db: Session):
    created = api.post("/accounts", json=account_payload(track_changes=False)).json()
    assert created["track_changes"] is False
    account = db.get(Account, created["id"])
    assert account is not None
    assert account.track_changes is False
    body = api.patch(f"/accounts/{created['id']}", json={"track_changes": True}).json()
    assert body["track_changes"] is True
    refused = api.patch(f"/accounts/{created['id']}", json={"track_changes": None})
    assert refused.status_code == 422
    assert "track_changes" in refused.text


def test_create_with_oauth2_keeps_the_tokens_encrypted(api: TestClient, db: Session):
    oauth2 = {
        "access_token": "at-SECRET-1",
        "refresh_token": "rt-SECRET-2",
        "expires_at": "2030-01-01T00:00:00Z",
        "client_id": "client",
        "client_secret": "cs-SECRET-3",
        "token_url": "https://oauth.example.com/token",
    }
    payload = account_payload(oauth2=oauth2)
    del payload["password"]
    response = api.post("/accounts", json=payload)
    assert response.status_code == 201, response.text
    assert response.json()["auth_method"] == "oauth2"
    assert "SECRET" not in response.text
    account = db.get(Account, response.json()["id"])
    assert account is not None
    assert "SECRET" not in account.credentials_encrypted
    stored = crypto.decrypt_json(account.credentials_encrypted)
    assert stored["access_token"] == "at-SECRET-1"
    assert stored["refresh_token"] == "rt-SECRET-2"
    assert stored["client_secret"] == "cs-SECRET-3"
    assert stored["expires_at"] == 1893456000
    assert stored["token_url"] == "https://oauth.example.com/token"


def test_create_disabled_has_no_schedule_entry(api: TestClient):
    body = api.post("/accounts", json=account_payload(enabled=False)).json()
    assert body["status"] == "disabled"
    assert body["id"] not in entry_ids()


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"imap_port": 0}, "imap_port", "greater than or equal to 1"),
        ({"imap_port": 70000}, "imap_port", "less than or equal to 65535"),
        ({"imap_security": "tls"}, "imap_security", "'ssl', 'starttls' or 'none'"),
        ({"poll_interval_seconds": 5}, "poll_interval_seconds", "at least 10 seconds"),
        ({"poll_interval_seconds": 10**9}, "poll_interval_seconds", "at most 604800 seconds"),
        ({"folders": []}, "folders", "at least one folder"),
        ({"folders": ["INBOX", ""]}, "folders", "at least 1 character"),
        ({"folders": ["INBOX", "INBOX"]}, "folders", "twice"),
        ({"email": "not-an-address"}, "email", "email address"),
        ({"email": "a\u0000b@example.com"}, "email", "email address"),
        ({"username": "a\u0000b"}, "username", "must not contain control characters"),
        ({"folders": ["IN\u0000BOX"]}, "folders", "must not contain control characters"),
        ({"imap_host": "imaps://x.example.com"}, "imap_host", "no scheme"),
        ({"password": None}, "body", "exactly one of 'password' and 'oauth2'"),
        ({"oauth2": {"access_token": "t"}}, "body", "exactly one of 'password' and 'oauth2'"),
        ({"initial_sync": "newest"}, "body", "needs initial_sync_count"),
        ({"initial_sync": "since"}, "body", "needs initial_sync_since"),
        ({"initial_sync_count": 5}, "body", "only with initial_sync 'newest'"),
        ({"initial_sync": "some"}, "initial_sync", "'all', 'newest' or 'since'"),
        ({"unknown": 1}, "unknown", "Extra inputs are not permitted"),
    ],
)
def test_create_validation_says_what_to_fix(api: TestClient, change, field, words):
    payload = account_payload(**change)
    payload = {k: v for k, v in payload.items() if v is not None}
    response = api.post("/accounts", json=payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValidationError"
    assert words in body["detail"]
    assert any(field in [str(p) for p in e["loc"]] for e in body["errors"]), body
    # Pydantic echoes the input by default; that input may be a password.
    assert payload.get("password", "absent") not in response.text


def test_validation_error_never_echoes_a_password(api: TestClient):
    payload = account_payload(password="hunter2-SECRET", imap_port="not-a-port")
    response = api.post("/accounts", json=payload)
    assert response.status_code == 422
    assert "hunter2-SECRET" not in response.text
    response = api.post("/accounts", json=account_payload(password=["hunter2-SECRET"]))
    assert response.status_code == 422
    assert "hunter2-SECRET" not in response.text


def test_interval_floor_follows_the_setting(api: TestClient, set_env: Callable[..., None]):
    set_env(MIN_POLL_INTERVAL_SECONDS=120)
    response = api.post("/accounts", json=account_payload(poll_interval_seconds=60))
    assert response.status_code == 422
    assert "at least 120 seconds" in response.json()["detail"]


def test_duplicate_mailbox_is_a_conflict(api: TestClient):
    first = api.post("/accounts", json=account_payload(username="same", imap_host="h.example"))
    assert first.status_code == 201
    again = api.post(
        "/accounts",
        json=account_payload(username="same", imap_host="H.EXAMPLE", email="other@example.com"),
    )
    assert again.status_code == 409
    assert again.json() == {
        "error": "Conflict",
        "detail": f"account {first.json()['id']} already polls 'same' on h.example:993",
    }
    # Another port is another mailbox.
    assert (
        api.post("/accounts", json=account_payload(username="same", imap_port=143)).status_code
        == 201
    )


def test_list_paginates_and_filters_by_status(api: TestClient, db: Session):
    ids = [api.post("/accounts", json=account_payload()).json()["id"] for _ in range(5)]
    make_account(db, status="error")
    page = api.get("/accounts", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 6
    assert [item["id"] for item in page["items"]] == ids[1:3]
    errors = api.get("/accounts", params={"status": "error"}).json()
    assert errors["total"] == 1
    assert errors["items"][0]["status"] == "error"
    assert api.get("/accounts", params={"status": "broken"}).status_code == 422
    assert api.get("/accounts", params={"limit": 0}).status_code == 422
    assert api.get("/accounts", params={"limit": 501}).status_code == 422


def test_get_and_404(api: TestClient):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    assert api.get(f"/accounts/{account_id}").json()["id"] == account_id
    missing = api.get("/accounts/999999")
    assert missing.status_code == 404
    assert missing.json() == {"error": "NotFound", "detail": "account 999999 does not exist"}
    assert api.get("/accounts/0").status_code == 422
    assert api.get("/accounts/abc").status_code == 422


def test_patch_changes_only_given_fields_and_the_schedule_follows(api: TestClient):
    created = api.post("/accounts", json=account_payload(poll_interval_seconds=60)).json()
    account_id = created["id"]
    response = api.patch(f"/accounts/{account_id}", json={"poll_interval_seconds": 90})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["poll_interval_seconds"] == 90
    assert body["email"] == created["email"]
    [entry] = [e for e in schedules.list_entries() if e.account_id == account_id]
    assert entry.interval == 90

    body = api.patch(f"/accounts/{account_id}", json={"enabled": False}).json()
    assert body["status"] == "disabled"
    assert body["disabled_reason"] == "disabled through the API"
    assert account_id not in entry_ids()


def test_patch_password_clears_the_backoff(api: TestClient, db: Session):
    account = make_account(
        db,
        status="error",
        consecutive_failures=4,
        backoff_until=utcnow() + timedelta(hours=1),
        last_error="authentication failed",
    )
    response = api.patch(f"/accounts/{account.id}", json={"password": "new-SECRET"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "active"
    assert body["consecutive_failures"] == 0
    assert body["backoff_until"] is None
    assert "new-SECRET" not in response.text
    db.refresh(account)
    assert crypto.decrypt_json(account.credentials_encrypted) == {"password": "new-SECRET"}


def test_a_new_login_is_marked_for_the_watcher_and_other_fields_are_not(
    api: TestClient, db: Session
):
    account = make_account(db, push=True, push_status="watching")
    api.patch(f"/accounts/{account.id}", json={"priority": 7, "folders": ["INBOX", "Sent"]})
    db.refresh(account)
    assert (account.login_changed_at, account.push_status) == (None, "watching")

    changes = (
        {"password": "new-SECRET"},
        {"oauth2": {"access_token": "tok-SECRET"}},
        {"username": "someone-else"},
    )
    for change in changes:
        account.login_changed_at, account.push_status = None, PushStatus.WATCHING
        db.commit()
        assert api.patch(f"/accounts/{account.id}", json=change).status_code == 200
        db.refresh(account)
        assert account.login_changed_at is not None, change
        assert account.push_status is None  # until the watcher has connected with it


def test_patch_other_fields_keep_the_backoff(api: TestClient, db: Session):
    until = utcnow() + timedelta(hours=1)
    account = make_account(db, status="error", consecutive_failures=4, backoff_until=until)
    body = api.patch(f"/accounts/{account.id}", json={"folders": ["INBOX", "Sent"]}).json()
    assert body["status"] == "error"
    assert body["consecutive_failures"] == 4
    assert body["backoff_until"] is not None


def test_reenabling_resets_the_status(api: TestClient, db: Session):
    account = make_account(
        db,
        enabled=False,
        status="disabled",
        disabled_reason="10 consecutive failures",
        consecutive_failures=10,
    )
    body = api.patch(f"/accounts/{account.id}", json={"enabled": True}).json()
    assert body["status"] == "active"
    assert body["enabled"] is True
    assert body["disabled_reason"] is None
    assert body["consecutive_failures"] == 0
    assert account.id in entry_ids()


def test_patch_switches_to_oauth2_and_back(api: TestClient, db: Session):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    body = api.patch(
        f"/accounts/{account_id}", json={"oauth2": {"access_token": "tok-SECRET"}}
    ).json()
    assert body["auth_method"] == "oauth2"
    body = api.patch(f"/accounts/{account_id}", json={"password": "pw-SECRET"}).json()
    assert body["auth_method"] == "password"
    both = api.patch(
        f"/accounts/{account_id}", json={"password": "x", "oauth2": {"access_token": "y"}}
    )
    assert both.status_code == 422
    assert "at most one of 'password' and 'oauth2'" in both.json()["detail"]


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"email": None}, 422, "email cannot be null"),
        ({"poll_interval_seconds": 1}, 422, "at least 10 seconds"),
        ({"folders": []}, 422, "at least one folder"),
        ({"initial_sync": "newest"}, 422, "needs initial_sync_count"),
        ({"initial_sync_since": "2024-01-01"}, 422, "only with initial_sync 'since'"),
    ],
)
def test_patch_validation(api: TestClient, change, status, words):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    response = api.patch(f"/accounts/{account_id}", json=change)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_patch_initial_sync_policy_switch(api: TestClient):
    account_id = api.post(
        "/accounts", json=account_payload(initial_sync="newest", initial_sync_count=10)
    ).json()["id"]
    body = api.patch(
        f"/accounts/{account_id}",
        json={"initial_sync": "since", "initial_sync_since": "2024-02-01"},
    ).json()
    assert body["initial_sync"] == "since"
    assert body["initial_sync_since"] == "2024-02-01"
    assert body["initial_sync_count"] is None


def test_patch_onto_another_mailbox_is_a_conflict(api: TestClient):
    api.post("/accounts", json=account_payload(username="taken"))
    other = api.post("/accounts", json=account_payload(username="free")).json()["id"]
    response = api.patch(f"/accounts/{other}", json={"username": "taken"})
    assert response.status_code == 409
    assert "already polls 'taken'" in response.json()["detail"]
    assert api.patch("/accounts/424242", json={"enabled": True}).status_code == 404


def test_delete_cascades_rows_objects_and_schedule(api: TestClient, db: Session):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    keep_id = api.post("/accounts", json=account_payload()).json()["id"]
    for owner in (account_id, keep_id):
        key = message_key(owner, "INBOX", 1, 1)
        backend = storage.put_object(key, b"raw", "message/rfc822")
        message = Message(
            account_id=owner,
            folder="INBOX",
            uidvalidity=1,
            uid=1,
            storage_backend=backend,
            storage_key=key,
            size=3,
        )
        db.add(message)
        db.flush()
        att_key = key + ".attachments/0-a.txt"
        storage.put_object(att_key, b"a", "text/plain")
        db.add(
            Attachment(
                message_id=message.id,
                safe_name="a.txt",
                content_type="text/plain",
                size=1,
                content_hash="0" * 64,
                storage_backend=backend,
                storage_key=att_key,
            )
        )
        db.add(FolderCursor(account_id=owner, folder="INBOX", uidvalidity=1, last_uid=1))
        db.add(PollRun(account_id=owner, outcome="success", task_id=f"t-{owner}"))
    db.commit()

    response = api.delete(f"/accounts/{account_id}")
    assert response.status_code == 204
    assert response.content == b""

    db.expire_all()
    assert db.get(Account, account_id) is None
    for table in (Message, FolderCursor, PollRun):
        assert (
            db.scalar(select(func.count()).select_from(table).where(table.account_id == account_id))
            == 0
        )
    assert db.scalar(select(func.count()).select_from(Attachment)) == 1
    assert list(storage.local_storage().keys(account_prefix(account_id))) == []
    assert len(list(storage.local_storage().keys(account_prefix(keep_id)))) == 2
    assert account_id not in entry_ids()
    assert keep_id in entry_ids()
    assert api.get(f"/accounts/{account_id}").status_code == 404
    assert api.delete(f"/accounts/{account_id}").status_code == 404


def test_delete_with_storage_down_deletes_the_account_and_a_sweep_its_objects(
    api: TestClient, db: Session, s3_bucket: str, moto_s3: MotoS3
):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    key = message_key(account_id, "INBOX", 1, 1)
    assert storage.put_object(key, b"raw", "x/y") == "s3"
    storage.local_storage().put(f"{key}.fallback", b"raw", "x/y")
    moto_s3.stop()
    try:
        assert api.delete(f"/accounts/{account_id}").status_code == 204
        assert api.get(f"/accounts/{account_id}").status_code == 404
        assert account_id not in entry_ids()
        # Storage was down: the objects are still there, and so is the record of them.
        assert list(storage.local_storage().keys(account_prefix(account_id)))
        cleanup = db.scalar(select(AccountCleanup))
        assert cleanup is not None and cleanup.account_id == account_id
    finally:
        moto_s3.start()
        moto_s3.create_bucket(s3_bucket)
    # moto forgot its objects on restart: put back the one S3 would still hold.
    assert storage.put_object(key, b"raw", "x/y") == "s3"

    purge_deleted()  # the storage sweep (beat's storage.sync, local housekeeping)

    assert list(storage.local_storage().keys(account_prefix(account_id))) == []
    assert not moto_s3.client().list_objects_v2(Bucket=s3_bucket).get("Contents")
    assert api.post("/accounts", json=account_payload()).json()["id"] > account_id


def test_poll_now_queues_a_task(api: TestClient, redis_db: RedisDb):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    response = api.post(f"/accounts/{account_id}/poll")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["account_id"] == account_id
    assert body["mode"] == "celery"
    assert body["task_id"]
    queued = redis_db.client().lrange("email", 0, -1)
    assert any(body["task_id"].encode() in raw for raw in queued)


def test_poll_now_refuses_a_disabled_account(api: TestClient):
    account_id = api.post("/accounts", json=account_payload(enabled=False)).json()["id"]
    response = api.post(f"/accounts/{account_id}/poll")
    assert response.status_code == 409
    assert "enable it first" in response.json()["detail"]
    assert api.post("/accounts/777/poll").status_code == 404


def test_poll_now_without_redis_is_a_quick_503(api: TestClient, set_env: Callable[..., None]):
    account_id = api.post("/accounts", json=account_payload()).json()["id"]
    set_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", SCHEDULER_MODE="celery")
    response = api.post(f"/accounts/{account_id}/poll")
    assert response.status_code == 503
    assert response.json()["error"] == "ServiceUnavailable"
    assert "did not answer" in response.json()["detail"]


def test_test_endpoint_succeeds_and_counts_messages(api, dovecot: Dovecot, mail_user):
    user, password = mail_user
    dovecot.append(user, b"Subject: hi\r\n\r\nbody\r\n")
    dovecot.create_folder(user, "Archive")
    account_id = create_dovecot_account(api, dovecot, user, password, folders=["INBOX", "Archive"])
    body = api.post(f"/accounts/{account_id}/test").json()
    assert body["ok"] is True
    assert body["stage"] is None
    assert [(f["name"], f["ok"], f["messages"]) for f in body["folders"]] == [
        ("INBOX", True, 1),
        ("Archive", True, 0),
    ]


def test_test_settings_before_saving(api: TestClient, db: Session, dovecot: Dovecot, mail_user):
    user, password = mail_user
    dovecot.append(user, b"Subject: hi\r\n\r\nbody\r\n")
    settings = {
        "imap_host": dovecot.host,
        "imap_port": dovecot.imap_port,
        "imap_security": "none",
        "username": user,
        "folders": ["INBOX", "Nope"],
    }
    body = api.post("/accounts/test", json={**settings, "password": password}).json()
    assert (body["ok"], body["stage"]) == (False, "folder")
    assert [(f["name"], f["ok"], f["messages"]) for f in body["folders"]] == [
        ("INBOX", True, 1),
        ("Nope", False, None),
    ]
    settings["folders"] = ["INBOX"]
    body = api.post("/accounts/test", json={**settings, "password": password}).json()
    assert (body["ok"], body["stage"], body["detail"]) == (True, None, "ok")
    wrong = api.post("/accounts/test", json={**settings, "password": "wrong-SECRET"}).json()
    assert (wrong["ok"], wrong["stage"]) == (False, "auth")
    assert "wrong-SECRET" not in str(wrong)
    missing = api.post("/accounts/test", json=settings)
    assert missing.status_code == 422
    assert "exactly one of 'password' and 'oauth2'" in missing.json()["detail"]
    # Nothing was saved.
    assert db.scalar(select(func.count(Account.id))) == 0


def test_test_endpoint_names_the_failing_stage(api, dovecot: Dovecot, mail_user):
    user, password = mail_user
    wrong_pw = create_dovecot_account(api, dovecot, user, "wrong-SECRET")
    body = api.post(f"/accounts/{wrong_pw}/test").json()
    assert (body["ok"], body["stage"]) == (False, "auth")
    assert "wrong-SECRET" not in str(body)

    # The Dovecot certificate is self-signed and IMAP_CA_BUNDLE is not set.
    untrusted = create_dovecot_account(
        api, dovecot, user, password, imap_port=dovecot.imaps_port, imap_security="ssl"
    )
    body = api.post(f"/accounts/{untrusted}/test").json()
    assert (body["ok"], body["stage"]) == (False, "tls")


def test_test_endpoint_missing_folder(api, dovecot: Dovecot, mail_user):
    user, password = mail_user
    account_id = create_dovecot_account(api, dovecot, user, password, folders=["INBOX", "Nope"])
    body = api.post(f"/accounts/{account_id}/test").json()
    assert (body["ok"], body["stage"]) == (False, "folder")
    assert "Nope" in body["detail"]
    assert [f["ok"] for f in body["folders"]] == [True, False]


def test_test_endpoint_connect_and_dns_failures(api: TestClient, dovecot: Dovecot):
    closed = api.post(
        "/accounts",
        json=account_payload(imap_host="127.0.0.1", imap_port=free_port(), imap_security="none"),
    ).json()["id"]
    body = api.post(f"/accounts/{closed}/test").json()
    assert (body["ok"], body["stage"]) == (False, "connect")
    unknown = api.post("/accounts", json=account_payload(imap_host="no-such-host.invalid")).json()[
        "id"
    ]
    body = api.post(f"/accounts/{unknown}/test").json()
    assert (body["ok"], body["stage"]) == (False, "dns")


def test_test_endpoint_gives_up_on_a_server_that_never_answers(
    api: TestClient, set_env: Callable[..., None]
):
    set_env(IMAP_CONNECT_TIMEOUT="1")
    with FakeImapServer(greeting=None) as silent:
        port = silent.port
        account_id = api.post(
            "/accounts",
            json=account_payload(imap_host="127.0.0.1", imap_port=port, imap_security="none"),
        ).json()["id"]
        body = api.post(f"/accounts/{account_id}/test").json()
    assert body["ok"] is False
    assert body["stage"] == "connect"
    assert "timed out" in body["detail"].lower()


def test_no_secret_in_any_response_or_log(
    api: TestClient, dovecot: Dovecot, mail_user, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    user, password = mail_user
    seen: list[str] = []
    account_id = create_dovecot_account(api, dovecot, user, password)
    for response in (
        api.get("/accounts"),
        api.get(f"/accounts/{account_id}"),
        api.patch(f"/accounts/{account_id}", json={"password": password}),
        api.post(f"/accounts/{account_id}/test"),
        api.post(f"/accounts/{account_id}/poll"),
        api.patch(f"/accounts/{account_id}", json={"password": "other-SECRET"}),
        api.post(f"/accounts/{account_id}/test"),
        api.patch(f"/accounts/{account_id}", json={"oauth2": {"access_token": "tok-SECRET"}}),
        api.get(f"/accounts/{account_id}/messages"),
        api.delete(f"/accounts/{account_id}"),
    ):
        assert response.status_code < 500, response.text
        seen.append(response.text)
    for secret in (password, "other-SECRET", "tok-SECRET"):
        assert not any(secret in text for text in seen)
        assert secret not in caplog.text


def test_poll_runs_and_folders_of_an_account(api: TestClient, db: Session):
    account = make_account(db, folders=["INBOX", "Archive"])
    other = make_account(db)
    started = utcnow() - timedelta(minutes=5)
    for index, outcome in enumerate(["success", "auth_error", "success"]):
        db.add(
            PollRun(
                account_id=account.id,
                started_at=started + timedelta(minutes=index),
                finished_at=started + timedelta(minutes=index, seconds=2),
                outcome=outcome,
                messages_count=index,
                task_id=f"task-{index}",
            )
        )
    db.add(PollRun(account_id=other.id, outcome="success"))
    db.add(FolderCursor(account_id=account.id, folder="INBOX", uidvalidity=7, last_uid=42))
    db.commit()

    runs = api.get(f"/accounts/{account.id}/poll-runs", params={"limit": 2}).json()
    assert runs["total"] == 3
    assert [(r["outcome"], r["task_id"]) for r in runs["items"]] == [
        ("success", "task-2"),
        ("auth_error", "task-1"),
    ]
    assert runs["items"][0]["duration_seconds"] == 2.0
    folders = api.get(f"/accounts/{account.id}/folders").json()["items"]
    assert [(f["name"], f["uidvalidity"], f["last_uid"]) for f in folders] == [
        ("INBOX", 7, 42),
        ("Archive", None, None),
    ]
    assert api.get("/accounts/999999/poll-runs").status_code == 404
    assert api.get("/accounts/999999/folders").status_code == 404


def test_pointing_an_account_that_holds_mail_at_another_mailbox_is_refused(
    api: TestClient, db: Session, dovecot: Dovecot, mail_user: tuple[str, str]
):
    """Its cursors and messages belong to the first mailbox: polling the second with them
    would skip its mail for good. A new account is the way; before any mail was taken
    (a typo in the username) the change is fine."""
    user, password = mail_user
    other_user = f"{user}-other"
    other_password = dovecot.add_user(other_user, "other-pw")
    dovecot.append(user, b"Subject: first mailbox\r\n\r\nbody\r\n")
    dovecot.append(other_user, b"Subject: second mailbox\r\n\r\nbody\r\n")
    typo = create_dovecot_account(api, dovecot, f"{user}-typo", password)
    response = api.patch(f"/accounts/{typo}", json={"username": user})
    assert response.status_code == 200, response.text  # nothing taken yet: fine

    assert poll_account(typo).outcome == "success"
    for change in (
        {"username": other_user, "password": other_password},
        {"imap_host": "localhost"},
        {"imap_port": dovecot.imaps_port, "imap_security": "ssl"},
    ):
        response = api.patch(f"/accounts/{typo}", json=change)
        assert response.status_code == 409, (change, response.text)
        detail = response.json()["detail"]
        assert f"already holds mail of {user!r}" in detail
        assert "create a new account" in detail
    body = api.get(f"/accounts/{typo}").json()
    assert (body["username"], body["imap_host"], body["imap_port"]) == (
        user,
        dovecot.host,
        dovecot.imap_port,
    )
    # The other mailbox, as a new account, gets its own mail.
    other = create_dovecot_account(api, dovecot, other_user, other_password)
    assert poll_account(other).messages == 1
