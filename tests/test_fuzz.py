"""Fuzz the API from its own OpenAPI schema: no input may cause a 500, and every answer
must match what the schema promises (status codes, content types, bodies)."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy.orm import Session

from backend.main import create_app
from backend.models import Attachment, Message, PollRun
from backend.storage import service as storage
from backend.storage.base import message_key
from tests.support.accounts import make_account
from tests.support.api import account_payload, auth_headers
from tests.support.net import free_port

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())
# Data that breaks the schema, for the routes that take account data and folder names:
# control characters, over-long URLs and host names, wrong types.
negative = schemathesis.openapi.from_asgi("/openapi.json", create_app()).include(
    path_regex=r"^/accounts(/\{account_id\}(/backfill)?)?$", method=["POST", "PATCH"]
)
negative.config.generation.update(modes=[GenerationMode.NEGATIVE])

FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


@pytest.fixture(autouse=True)
def _quick(set_env: Callable[..., None]) -> None:
    # Keep each example quick: short Celery inspects, and account tests that give up
    # fast on whatever host the fuzzer made up.
    set_env(CELERY_INSPECT_TIMEOUT_SECONDS="0.1", IMAP_CONNECT_TIMEOUT="1")


@pytest.fixture
def existing(db: Session) -> dict[str, object]:
    """An account (on a closed port) with a stored message, an attachment and a poll run:
    path parameters that name real objects."""
    account = make_account(db, imap_host="127.0.0.1", imap_port=free_port(), imap_security="none")
    key = message_key(account.id, "INBOX", 1, 1)
    message = Message(
        account_id=account.id,
        folder="INBOX",
        uidvalidity=1,
        uid=1,
        storage_backend=storage.put_object(key, b"Subject: x\r\n\r\nbody\r\n", "message/rfc822"),
        storage_key=key,
    )
    db.add(message)
    db.flush()
    attachment = Attachment(
        message_id=message.id,
        filename="a.txt",
        safe_name="a.txt",
        content_type="text/plain",
        size=1,
        content_hash="0" * 64,
        storage_backend=storage.put_object(key + ".a", b"a", "text/plain"),
        storage_key=key + ".a",
    )
    db.add_all([attachment, PollRun(account_id=account.id, outcome="success", task_id="done")])
    db.commit()
    return {
        "account_id": account.id,
        "message_id": message.id,
        "attachment_id": attachment.id,
        "task_id": "done",
    }


def call_and_validate(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    """Every schema check, with two exceptions. Cross-field rules (one of password /
    oauth2, the initial-sync pairs) and rules about the stored account are not in the
    schema, so a 422 for schema-valid data is expected. And a 502 / 503 that names the
    failing upstream (the IMAP server of a backfill) is an answer; a 500 never is."""
    response = case.call_and_validate(
        headers=auth_headers(), excluded_checks=[positive_data_acceptance, not_a_server_error]
    )
    assert response.status_code != 500, response.text
    if response.status_code >= 500:
        assert response.status_code in (502, 503), response.text
        assert set(response.json()) == {"error", "detail"}


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_never_fails_on_any_input(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    call_and_validate(case)


@schema.parametrize()
@FUZZ_SETTINGS
def test_api_never_fails_on_existing_objects(
    case: schemathesis.Case,  # type: ignore[type-arg]
    existing: dict[str, object],
) -> None:
    params = case.path_parameters or {}
    case.path_parameters = {name: existing.get(name, value) for name, value in params.items()}
    call_and_validate(case)


@negative.parametrize()
@FUZZ_SETTINGS
def test_api_refuses_what_the_schema_refuses_without_failing(
    case: schemathesis.Case,  # type: ignore[type-arg]
    existing: dict[str, object],
) -> None:
    params = case.path_parameters or {}
    case.path_parameters = {name: existing.get(name, value) for name, value in params.items()}
    response = case.call(headers=auth_headers())
    # As above: a 502 from the (closed) IMAP server of a backfill is an answer.
    assert response.status_code not in (500, 501, 504), response.text
    if response.status_code >= 400:
        assert {"error", "detail"} <= set(response.json())


# The inputs a probe of the service found to be 500s or to reach the IMAP server.
HOSTILE: list[dict[str, Any]] = [
    {"webhook_url": "https://hooks.example.com/" + "a" * 2100},
    {"imap_host": "a" * 64 + ".example.com"},
    {"username": "zoë"},
    {"password": "pässwörd"},
    {"username": "me\r\nA1 CREATE injected"},
    {"password": "pw\r\nA1 CREATE injected"},
    {"folders": ["INBOX\r\nA1 DELETE INBOX"]},
    {"folders": ["INBOX\x85"]},
    {"imap_host": "169.254.169.254"},
    {"password": None, "oauth2": {"access_token": "a\nb"}},
]


@pytest.mark.parametrize("fields", HOSTILE)
@pytest.mark.parametrize("environment", ["test", "production"])
def test_hostile_account_data_is_a_4xx(
    fields: dict[str, Any],
    environment: str,
    existing: dict[str, object],
    set_env: Callable[..., None],
) -> None:
    set_env(ENVIRONMENT=environment)
    create = schema["/accounts"]["POST"].Case(body=account_payload(**fields))
    update = schema["/accounts/{account_id}"]["PATCH"].Case(
        body=fields, path_parameters={"account_id": existing["account_id"]}
    )
    for case in (create, update):
        response = case.call(headers=auth_headers())
        # Where the policy allows the address (outside production), it is a fine host.
        if fields == {"imap_host": "169.254.169.254"} and environment == "test":
            assert response.status_code in (200, 201), response.text
            continue
        assert response.status_code == 422, response.text
        case.validate_response(response, excluded_checks=[positive_data_acceptance])


# Text no codec can write (lone surrogates), control characters (C0, C1) and a
# bidirectional override: in every string field of every request body, and in the string
# path and query parameters (issue 31: a lone surrogate in webhook_secret was a 500).
BAD_TEXT = ["\ud800", "a\udfffb", "\x00", "x\x85y", "\u202eexe.png", "\r\nA1 NOOP"]


def _string_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _string_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _string_paths(item, (*path, index))


def _with(value: Any, path: tuple[Any, ...], new: str) -> Any:
    copied = copy.deepcopy(value)
    target = copied
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copied


def _bodies(closed_port: int) -> list[tuple[str, str, dict[str, Any]]]:
    server = {"imap_host": "127.0.0.1", "imap_port": closed_port, "imap_security": "none"}
    oauth2 = {
        "access_token": "at",
        "refresh_token": "rt",
        "client_id": "cid",
        "client_secret": "cs",
        "token_url": "https://tokens.example.org/token",
    }
    webhook = {"webhook_url": "https://hooks.example.org/in", "webhook_secret": "whsec"}
    create = account_payload(**server, **webhook)
    with_oauth2 = {k: v for k, v in account_payload(**server).items() if k != "password"}
    update = {k: v for k, v in create.items() if k not in ("imap_port", "poll_interval_seconds")}
    connection = {k: create[k] for k in ("imap_host", "imap_security", "username", "password")}
    return [
        ("POST", "/accounts", create),
        ("POST", "/accounts", {**with_oauth2, "oauth2": oauth2}),
        ("PATCH", "/accounts/{account_id}", update),
        ("PATCH", "/accounts/{account_id}", {"oauth2": oauth2}),
        ("POST", "/accounts/test", {**connection, "imap_port": closed_port}),
        ("POST", "/accounts/{account_id}/backfill", {"folders": ["INBOX"], "dry_run": True}),
    ]


def test_no_string_field_of_any_body_can_cause_a_500(
    api: TestClient, existing: dict[str, object]
) -> None:
    tried = 0
    for method, template, body in _bodies(free_port()):
        path = template.format(**existing)
        for field in _string_paths(body):
            for bad in BAD_TEXT:
                # A mailbox of its own each time: a duplicate would be a 409 before the
                # value reached anything.
                unique = uuid.uuid4().hex[:10]
                fresh = {**body, "username": unique, "email": f"{unique}@example.com"}
                if "username" not in body:
                    fresh = body
                response = api.request(
                    method,
                    path,
                    content=json.dumps(_with(fresh, field, bad), ensure_ascii=True),
                    headers={"Content-Type": "application/json"},
                )
                tried += 1
                where = (method, template, field, bad)
                assert response.status_code < 500 or response.status_code in (502, 503), where
                assert "\\ud800" not in response.text and "\\udfff" not in response.text, where
    assert tried > 200  # every field of every body was tried


@pytest.mark.parametrize("bad", ["%ED%A0%80", "%00", "%C2%85", "%E2%80%AE"])
def test_no_string_parameter_can_cause_a_500(api: TestClient, bad: str) -> None:
    for path in (
        f"/admin/celery/tasks/{bad}",
        f"/admin/celery/tasks/{bad}/retry",
        f"/accounts?status={bad}",
        f"/accounts?{bad}=1",
        f"/accounts/{bad}",
    ):
        method = "POST" if path.endswith("/retry") else "GET"
        response = api.request(method, path)
        assert response.status_code < 500, (path, response.text)
