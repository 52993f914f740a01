"""The compose stack without Docker: every service's own command from docker-compose.yml,
run as a local process against the test PostgreSQL, Redis, Dovecot and moto S3.

migrate runs once; then api, celery-beat, two celery-workers (polls), one
celery-processor (processing) and flower. Accounts are created through the API, their mail
is ingested by the workers on beat's schedule, and Flower and /admin/celery/workers both
list the three workers, each consuming only its own pool's queues.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from tests.conftest import ADMIN_TOKEN
from tests.deploy.stack import (
    Api,
    ServiceProcess,
    account_body,
    compose_command,
    compose_environment,
    email,
    top_level_files,
    watched,
    worker_names,
)
from tests.support.dovecot import Dovecot
from tests.support.net import free_port, wait_for_port
from tests.support.receiver import SECRET as RECEIVER_SECRET
from tests.support.receiver import Receiver
from tests.support.redis_db import RedisDb
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3
from tests.support.wait import wait_for

FLOWER_LOGIN = ("admin", "flower-" + uuid.uuid4().hex[:12])
WORKERS = ("worker1", "worker2")
PROCESSORS = ("processor1",)
# Each pool's queues: polls never share a slot with processing (docker-compose.yml).
QUEUES = {"worker": {"email"}, "processor": {"workflow", "default"}}
START_TIMEOUT = 120.0
# Beat spreads the first runs of new entries over their interval, so a first poll may
# come up to one interval after the account is created.
INTERVAL_SECONDS = 10


@dataclass
class Stack:
    api: Api
    flower_url: str
    processes: dict[str, ServiceProcess]
    bucket: str
    secrets: dict[str, str]

    def all(self) -> list[ServiceProcess]:
        return list(self.processes.values())


@pytest.fixture
def stack(
    tmp_path: Path, database_url: str, redis_db: RedisDb, moto_s3: MotoS3, dovecot: Dovecot
) -> Iterator[Stack]:
    bucket = f"mailbeat-{uuid.uuid4().hex[:10]}"
    moto_s3.create_bucket(bucket)
    api_port, flower_port = free_port(), free_port()
    data_dir = tmp_path / "data"  # the app-data volume the API and the workers share
    secrets = {"ADMIN_API_TOKEN": ADMIN_TOKEN, "ENCRYPTION_KEY": Fernet.generate_key().decode()}

    def env_for(name: str) -> dict[str, str]:
        env = compose_environment(name)
        # The variables compose sets, pointed at the test bed instead of its services.
        replaced = {
            "DATA_DIR": str(data_dir),
            "LOCAL_STORAGE_DIR": str(data_dir / "storage"),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_db.url,
            "S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "S3_BUCKET": bucket,
            "S3_ACCESS_KEY_ID": ACCESS_KEY,
            "S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN),
        }
        env.update({key: value for key, value in replaced.items() if key in env})
        assert env["ENVIRONMENT"] == "production"
        # What compose's env_file (.env) adds; nothing else from this shell.
        env.update(
            secrets,
            PATH="/usr/bin:/bin",
            HOME=str(tmp_path),
            S3_REGION=REGION,
            IMAP_CA_BUNDLE=str(dovecot.cert_path),
            # Production refuses internal addresses; the test bed's Dovecot is one.
            OUTBOUND_ALLOWLIST="127.0.0.1/32",
        )
        return env

    files_before = top_level_files()
    migrate = ServiceProcess("migrate", compose_command("migrate"), env_for("migrate"), tmp_path)
    assert migrate.start().wait(timeout=START_TIMEOUT) == 0, migrate.log()

    # Only what lets several copies share one host changes: ports and worker node names
    # (compose gives each container its own hostname and network address instead).
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
            name: ServiceProcess(
                name,
                compose_command("celery-worker", None, "-n", f"{name}@%h", "--concurrency=2"),
                env_for("celery-worker"),
                tmp_path,
            )
            for name in WORKERS
        },
        **{
            name: ServiceProcess(
                name,
                compose_command("celery-processor", None, "-n", f"{name}@%h", "--concurrency=2"),
                env_for("celery-processor"),
                tmp_path,
            )
            for name in PROCESSORS
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
            api=Api(f"http://127.0.0.1:{api_port}", ADMIN_TOKEN),
            flower_url=f"http://127.0.0.1:{flower_port}",
            processes=processes,
            bucket=bucket,
            secrets=secrets,
        )
    finally:
        codes = {name: process.stop() for name, process in processes.items()}
    # SIGTERM (compose stop, a scale-down) is a clean stop for every one of them: exit 0
    # (a container exiting 143 looks failed).
    for name, code in codes.items():
        assert code == 0, f"{name} exited {code}:\n{processes[name].log()[-3000:]}"
    # Nothing wrote into the code directory (/app, read-only to the image's user).
    assert top_level_files() == files_before


HOOK_PASSWORD = "hook-basic-" + uuid.uuid4().hex
QUERY_TOKEN = "query-token-" + uuid.uuid4().hex


@pytest.mark.e2e
def test_the_compose_services_ingest_mail_end_to_end(
    stack: Stack, dovecot: Dovecot, moto_s3: MotoS3, receiver: Receiver
) -> None:
    node_names = {f"{name}@{socket.gethostname()}" for name in (*WORKERS, *PROCESSORS)}
    logs = stack.all()
    api = stack.api

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

    assert (
        wait_for(flower_workers, "the workers in Flower", START_TIMEOUT, **watched(*logs))
        == node_names
    )

    # /admin/celery/workers agrees with Flower, and each worker serves its pool's queues.
    def admin_workers() -> Any:
        response = api("GET", "/admin/celery/workers")
        body = response.json()
        return body if response.status_code == 200 and node_names <= worker_names(body) else None

    workers = wait_for(
        admin_workers, "the workers in the admin API", START_TIMEOUT, **watched(*logs)
    )
    assert worker_names(workers) == node_names
    listed = workers.get("workers", workers) if isinstance(workers, dict) else workers
    for worker in listed.values() if isinstance(listed, dict) else listed:
        queues = {q if isinstance(q, str) else q["name"] for q in worker["queues"]}
        assert queues == QUEUES[worker["name"].split("@")[0].rstrip("0123456789")], worker

    # Two mailboxes with mail; accounts created through the API; beat's schedule has the
    # workers ingest everything, over TLS, with the raw messages in S3.
    sizes: dict[str, int] = {}
    for count in (3, 2):
        username = f"e2e-{uuid.uuid4().hex[:8]}"
        dovecot.add_user(username, "pw-" + username)
        dovecot.append_many(username, [email(f"{username} {i}") for i in range(count)])
        sizes[username] = count
    # The first one's webhook has basic auth: a secret that must reach the receiver and
    # no log.
    hook = {
        "webhook_url": f"http://hookuser:{HOOK_PASSWORD}@127.0.0.1:{receiver.port}/hook",
        "webhook_secret": RECEIVER_SECRET,
    }
    accounts = {
        username: api.create_account(
            {
                **account_body(dovecot, username, ssl=True, interval=INTERVAL_SECONDS),
                **(hook if index == 0 else {}),
            }
        )
        for index, username in enumerate(sizes)
    }

    def all_ingested() -> bool:
        return all(api.message_total(accounts[u]) == n for u, n in sizes.items())

    wait_for(all_ingested, "the mail ingested", START_TIMEOUT, **watched(*logs))
    for username, count in sizes.items():
        assert api.subjects(accounts[username]) == sorted(f"{username} {i}" for i in range(count))

    # New mail is picked up by the next scheduled poll, and nothing is stored twice.
    first = next(iter(sizes))
    dovecot.append(first, email(f"{first} late"))
    sizes[first] += 1
    wait_for(all_ingested, "the late message", START_TIMEOUT, **watched(*logs))

    # The raw bytes are in S3 (MinIO's role in compose) and come back through the API.
    keys = [
        obj["Key"]
        for obj in moto_s3.client().list_objects_v2(Bucket=stack.bucket).get("Contents", [])
    ]
    assert len([key for key in keys if key.endswith(".eml")]) == sum(sizes.values()), keys
    item = api("GET", f"/accounts/{accounts[first]}/messages").json()["items"][0]
    raw = api("GET", f"/messages/{item['id']}/raw")
    assert raw.status_code == 200
    assert b"body of " in raw.content

    # The processor delivered the first mailbox's mail, with the basic auth; and a token
    # sent in a query string is refused.
    wait_for(
        lambda: len(receiver.delivered()) >= sizes[first],
        "the webhooks delivered",
        START_TIMEOUT,
        **watched(*logs),
    )
    assert all(r.headers["authorization"].startswith("Basic ") for r in receiver.delivered())
    assert httpx.get(f"{api.url}/accounts?token={QUERY_TOKEN}", timeout=30).status_code == 401

    # /health sees every dependency and both workers; /metrics has the workers' polls.
    health = api("GET", "/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "healthy", health.json()
    assert health.json()["checks"]["celery_worker"] == "ok (3 workers)"
    metrics = httpx.get(api.url + "/metrics", timeout=30).text
    ingested = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("mailbeat_messages_ingested_total")
    ]
    assert ingested == [sum(sizes.values())], ingested

    # A scale-down: one worker gets SIGTERM (what `--scale celery-worker=1` sends), stops
    # cleanly, and the other carries on alone.
    assert stack.processes["worker1"].stop() == 0, stack.processes["worker1"].log()[-3000:]
    dovecot.append(first, email(f"{first} after scale-down"))
    sizes[first] += 1
    remaining = [p for p in logs if p.name != "worker1"]
    wait_for(all_ingested, "mail after the scale-down", START_TIMEOUT, **watched(*remaining))
    assert api("GET", "/health").json()["checks"]["celery_worker"] == "ok (2 workers)"

    # No process wrote a secret it was given or handled (issue 31: httpx's request line
    # carried the webhook's password; the access log the query's token).
    secrets = {
        **stack.secrets,
        "the webhook's basic-auth password": HOOK_PASSWORD,
        "the webhook secret": RECEIVER_SECRET,
        "a token in a query string": QUERY_TOKEN,
        "the S3 secret key": SECRET_KEY,
        "Flower's password": FLOWER_LOGIN[1],
        **{f"{username}'s IMAP password": dovecot.passwords[username] for username in sizes},
    }
    for process in stack.all():
        text = process.log()
        leaked = [what for what, secret in secrets.items() if secret in text]
        assert leaked == [], f"{process.name} logged {leaked}"
