"""The compose stack without Docker: every service's own command from docker-compose.yml,
run as a local process against the test PostgreSQL, Redis, Dovecot and moto S3.

migrate runs once; then api, celery-beat, two celery-workers and flower. Accounts are
created through the API, their mail is ingested by the workers on beat's schedule, and
Flower and /admin/celery/workers both list the two workers.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.deploy.stack import (
    ServiceProcess,
    compose_command,
    compose_environment,
    wait_until,
)
from tests.support.dovecot import Dovecot
from tests.support.net import free_port, wait_for_port
from tests.support.redis_db import RedisDb
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3

FLOWER_LOGIN = ("admin", "flower-" + uuid.uuid4().hex[:12])
WORKERS = ("worker1", "worker2")
START_TIMEOUT = 120.0
# Beat spreads the first runs of new entries over their interval, so a first poll can
# come up to one interval after the account is created.
INTERVAL_SECONDS = 10


@dataclass
class Stack:
    api_url: str
    flower_url: str
    processes: dict[str, ServiceProcess]
    bucket: str
    s3: MotoS3

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.request(method, self.api_url + path, headers=headers, timeout=30, **kwargs)

    def all(self) -> list[ServiceProcess]:
        return list(self.processes.values())


def _message(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "sender@example.com"
    message["To"] = "inbox@example.com"
    message["Subject"] = subject
    message["Message-ID"] = f"<{uuid.uuid4().hex}@example.com>"
    message.set_content(f"body of {subject}\n")
    return message.as_bytes()


@pytest.fixture
def stack(
    tmp_path: Path,
    database_url: str,
    redis_db: RedisDb,
    moto_s3: MotoS3,
    dovecot: Dovecot,
) -> Iterator[Stack]:
    bucket = f"mailbeat-{uuid.uuid4().hex[:10]}"
    moto_s3.create_bucket(bucket)
    api_port, flower_port = free_port(), free_port()
    data_dir = tmp_path / "data"

    def env_for(name: str) -> dict[str, str]:
        env = compose_environment(name)
        # The same variables compose sets, pointed at the test bed instead of its services.
        env.update(
            ENVIRONMENT="production",
            DATA_DIR=str(data_dir),
            LOCAL_STORAGE_DIR=str(data_dir / "storage"),
            DATABASE_URL=database_url,
            REDIS_URL=redis_db.url,
            S3_ENDPOINT_URL=moto_s3.endpoint_url,
            S3_BUCKET=bucket,
            S3_REGION=REGION,
            S3_ACCESS_KEY_ID=ACCESS_KEY,
            S3_SECRET_ACCESS_KEY=SECRET_KEY,
            S3_ADDRESSING_STYLE="path",
        )
        if "FLOWER_BASIC_AUTH" in env:
            env["FLOWER_BASIC_AUTH"] = ":".join(FLOWER_LOGIN)
        # What compose's env_file (.env) adds: the secrets; nothing else from this shell.
        env.update(
            PATH="/usr/bin:/bin",
            HOME=str(tmp_path),
            ADMIN_API_TOKEN=ADMIN_TOKEN,
            ENCRYPTION_KEY=_encryption_key(),
            IMAP_CA_BUNDLE=str(dovecot.cert_path),
            MIN_POLL_INTERVAL_SECONDS=str(INTERVAL_SECONDS),
        )
        return env

    migrate = ServiceProcess("migrate", compose_command("migrate"), env_for("migrate"), tmp_path)
    assert migrate.start().wait(timeout=START_TIMEOUT) == 0, migrate.log()

    processes = {
        "api": ServiceProcess(
            "api",
            compose_command("api", {"8000": str(api_port), "0.0.0.0": "127.0.0.1"}),
            env_for("api"),
            tmp_path,
        ),
        "celery-beat": ServiceProcess(
            "celery-beat", compose_command("celery-beat"), env_for("celery-beat"), tmp_path
        ),
        **{
            # Two copies on one host need distinct node names; compose gives each
            # container its own hostname instead.
            name: ServiceProcess(
                name,
                compose_command("celery-worker", None, "-n", f"{name}@%h", "--concurrency=2"),
                env_for("celery-worker"),
                tmp_path,
            )
            for name in WORKERS
        },
        "flower": ServiceProcess(
            "flower",
            compose_command("flower", {"--port=5555": f"--port={flower_port}"}),
            env_for("flower"),
            tmp_path,
        ),
    }
    try:
        for process in processes.values():
            process.start()
        wait_for_port(api_port, timeout=START_TIMEOUT)
        wait_for_port(flower_port, timeout=START_TIMEOUT)
        yield Stack(
            api_url=f"http://127.0.0.1:{api_port}",
            flower_url=f"http://127.0.0.1:{flower_port}",
            processes=processes,
            bucket=bucket,
            s3=moto_s3,
        )
    finally:
        codes = {name: process.stop() for name, process in processes.items()}
        # SIGTERM is a clean stop for every one of them (a scale-down, `compose stop`).
        for name, code in codes.items():
            assert code in (0, -15), f"{name} exited {code}:\n{processes[name].log()[-3000:]}"


_KEY: list[str] = []


def _encryption_key() -> str:
    if not _KEY:
        from cryptography.fernet import Fernet

        _KEY.append(Fernet.generate_key().decode())
    return _KEY[0]


def _create_account(stack: Stack, dovecot: Dovecot, user: tuple[str, str]) -> dict[str, Any]:
    username, password = user
    response = stack.api(
        "POST",
        "/accounts",
        json={
            "email": f"{username}@example.com",
            "imap_host": dovecot.host,
            "imap_port": dovecot.imaps_port,
            "imap_security": "ssl",
            "username": username,
            "password": password,
            "folders": ["INBOX"],
            "poll_interval_seconds": INTERVAL_SECONDS,
        },
    )
    assert response.status_code == 201, response.text
    account: dict[str, Any] = response.json()
    return account


def _messages(stack: Stack, account_id: int) -> dict[str, Any]:
    response = stack.api("GET", f"/accounts/{account_id}/messages", params={"limit": 100})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.e2e
def test_the_compose_services_ingest_mail_end_to_end(stack: Stack, dovecot: Dovecot) -> None:
    hostname = socket.gethostname()
    node_names = {f"{name}@{hostname}" for name in WORKERS}
    logs = stack.all()

    # Flower lists both workers through its API, behind its login.
    assert httpx.get(stack.flower_url + "/api/workers", timeout=30).status_code == 401

    def flower_workers() -> set[str] | None:
        response = httpx.get(
            stack.flower_url + "/api/workers",
            params={"refresh": "true"},
            auth=FLOWER_LOGIN,
            timeout=30,
        )
        names = set(response.json()) if response.status_code == 200 else set()
        return names if node_names <= names else None

    assert wait_until("both workers in Flower", flower_workers, START_TIMEOUT, *logs) == node_names

    # /admin/celery/workers agrees with Flower.
    def admin_workers() -> dict[str, Any] | None:
        response = stack.api("GET", "/admin/celery/workers")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and node_names <= _names(body) else None

    workers = wait_until("both workers in the admin API", admin_workers, START_TIMEOUT, *logs)
    assert _names(workers) == node_names
    for worker in _worker_list(workers):
        queues = {q if isinstance(q, str) else q["name"] for q in worker["queues"]}
        assert queues == {"email", "workflow", "default"}

    # Mail in two mailboxes, accounts created through the API, ingested by the workers.
    users = [(u := f"e2e-{uuid.uuid4().hex[:8]}", dovecot.add_user(u, "pw-" + u)) for _ in "ab"]
    sizes = {users[0][0]: 3, users[1][0]: 2}
    for username, _ in users:
        dovecot.append_many(username, [_message(f"{username} {i}") for i in range(sizes[username])])
    accounts = {username: _create_account(stack, dovecot, (username, pw)) for username, pw in users}

    def ingested(expected: dict[str, int]) -> dict[str, dict[str, Any]] | None:
        found = {u: _messages(stack, accounts[u]["id"]) for u in expected}
        return found if all(found[u]["total"] == n for u, n in expected.items()) else None

    found = wait_until("the mail ingested", lambda: ingested(sizes), START_TIMEOUT, *logs)
    for username, body in found.items():
        subjects = sorted(item["subject"] for item in body["items"])
        assert subjects == sorted(f"{username} {i}" for i in range(sizes[username]))

    # New mail arrives and is picked up by the schedule, nothing twice.
    first_user = users[0][0]
    dovecot.append(first_user, _message(f"{first_user} late"))
    sizes[first_user] += 1
    wait_until("the late message", lambda: ingested(sizes), START_TIMEOUT, *logs)

    # The raw bytes are in S3 (MinIO's role in compose), byte-identical through the API.
    item = found[first_user]["items"][0]
    raw = stack.api("GET", f"/messages/{item['id']}/raw")
    assert raw.status_code == 200
    assert b"body of" in raw.content
    keys = [
        obj["Key"] for obj in stack.s3.client().list_objects_v2(Bucket=stack.bucket)["Contents"]
    ]
    assert len([k for k in keys if k.endswith(".eml")]) >= sum(sizes.values())

    # /health sees every dependency and both workers.
    health = stack.api("GET", "/health")
    assert health.status_code == 200, health.text
    checks = health.json()["checks"]
    assert checks["database"] == "ok" and checks["redis"] == "ok"
    assert checks["celery_worker"] == "ok (2 workers)"


def _worker_list(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("workers", body)
    return list(items.values()) if isinstance(items, dict) else list(items)


def _names(body: dict[str, Any]) -> set[str]:
    return {str(worker["name"]) for worker in _worker_list(body)}
