"""`make run` (python -m backend.cli run) on a fresh checkout, as a real process: it
writes .env, migrates SQLite, and serves mailbeat with or without Redis."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from backend.cli import main, stack_commands
from tests.deploy.files import DESIGN_COMMANDS, ROOT
from tests.deploy.stack import Api, account_body, email, watched
from tests.support.dovecot import Dovecot
from tests.support.net import free_port, wait_for_port
from tests.support.receiver import SECRET, Receiver
from tests.support.redis_db import RedisDb
from tests.support.wait import wait_for


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    code: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def cli_run(cwd: Path, *args: str, **env: str) -> Iterator[Run]:
    """`python -m backend.cli run` in `cwd` with only what a shell on a new laptop has
    (none of the test bed's settings); Ctrl-C (SIGINT) on the way out."""
    port = free_port()
    log_path = cwd / "run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "run", "--port", str(port), *args],
            cwd=cwd,
            env={"PATH": os.environ["PATH"], "HOME": str(cwd), "PYTHONPATH": str(ROOT), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    run = Run(process, port, log_path)
    try:
        wait_for_port(port, timeout=120)
        yield run
    finally:
        process.send_signal(signal.SIGINT)
        run.code = process.wait(timeout=60)


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _ingests_mail(api: Api, dovecot: Dovecot, *, ssl: bool = False) -> list[str]:
    username = f"run-{uuid.uuid4().hex[:8]}"
    dovecot.add_user(username, "pw-" + username)
    dovecot.append_many(username, [email(f"{username} {i}") for i in range(2)])
    account_id = api.create_account(account_body(dovecot, username, ssl=ssl))
    # Poll now rather than wait for the first tick: the same path in both modes.
    assert api("POST", f"/accounts/{account_id}/poll").status_code == 202
    wait_for(lambda: api.message_total(account_id) == 2, "the mail ingested", 120, **watched())
    return api.subjects(account_id)


@pytest.mark.e2e
def test_without_redis_it_serves_the_api_and_polls_in_process(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    receiver = Receiver()
    receiver.up()
    try:
        with cli_run(
            tmp_path, REDIS_URL=closed, WEBHOOK_URL=receiver.url, WEBHOOK_SECRET=SECRET
        ) as run:
            health = httpx.get(run.url + "/health", timeout=30)
            token = _env_file(tmp_path / ".env")["ADMIN_API_TOKEN"]
            unauthorized = httpx.get(run.url + "/accounts", timeout=30)
            subjects = _ingests_mail(Api(run.url, token), dovecot)
            wait_for(lambda: len(receiver.delivered()) == 2, "the webhook", 60, **watched())
    finally:
        receiver.down()
    output = run.output()

    # PUBLIC_BASE_URL is unset (.env leaves it empty): links follow the port served.
    links = [r.json()["data"]["message"]["raw_url"] for r in receiver.delivered()]
    assert all(link.startswith(f"{run.url}/messages/") for link in links), links

    assert health.status_code == 200, health.text
    assert health.json()["checks"]["database"] == "ok"
    assert health.json()["checks"]["redis"].startswith("not used (local mode")
    assert unauthorized.status_code == 401
    assert len(subjects) == 2
    # The .env a fresh machine gets, and what the banner says.
    Fernet(_env_file(tmp_path / ".env")["ENCRYPTION_KEY"].encode())
    assert "local mode" in output
    assert f"{run.url}/docs" in output
    assert f"curl -X POST {run.url}/accounts" in output
    assert str(tmp_path / ".env") in output  # where the token is
    assert token not in output  # but never the token itself
    with sqlite3.connect(tmp_path / "data" / "mailbeat.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert "Traceback" not in output
    assert run.code == 0, output


@pytest.mark.e2e
def test_with_redis_it_runs_api_beat_two_workers_and_a_watcher_and_stops_them_together(
    tmp_path: Path, redis_db: RedisDb, dovecot: Dovecot
) -> None:
    flower_port = free_port()
    flower = ("--flower", "--flower-port", str(flower_port))
    with cli_run(tmp_path, *flower, REDIS_URL=redis_db.url) as run:
        children = _children(run.process.pid)
        api = Api(run.url, _env_file(tmp_path / ".env")["ADMIN_API_TOKEN"])
        wait_for_port(flower_port, timeout=120)
        user, password = _env_file(tmp_path / ".env")["FLOWER_BASIC_AUTH"].split(":", 1)
        flower_url = f"http://127.0.0.1:{flower_port}/api/workers"
        flower_anonymous = httpx.get(flower_url, timeout=30)
        flower_workers = httpx.get(flower_url, auth=(user, password), timeout=30)

        def worker_seen() -> dict[str, str] | None:
            checks: dict[str, str] = api("GET", "/health").json()["checks"]
            return checks if checks["celery_worker"] == "ok (2 workers)" else None

        checks = wait_for(worker_seen, "both workers in /health", 120, **watched())
        subjects = _ingests_mail(api, dovecot)
    output = run.output()

    assert checks["celery_worker"] == "ok (2 workers)"  # the poll worker and the processor
    assert checks["redis"] == "ok"
    assert len(subjects) == 2
    assert "API, Celery beat, a poll worker, a processor and a watcher" in output
    assert f"Flower on http://127.0.0.1:{flower_port}" in output
    # Flower asks for the login .env holds, as in compose.
    assert flower_anonymous.status_code == 401
    assert flower_workers.status_code == 200, flower_workers.text
    # Ctrl-C stopped all six children (API, beat, worker, processor, watcher, Flower), not
    # just the parent.
    assert len(children) == 6, output
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], output
    assert run.code == 0, output


@pytest.mark.e2e
def test_an_existing_env_file_is_kept(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    key = Fernet.generate_key().decode()
    env_file.write_text(f"ADMIN_API_TOKEN=mine-{key[:8]}\nENCRYPTION_KEY={key}\n")
    before = env_file.read_text()
    with cli_run(tmp_path, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as run:
        response = httpx.get(
            run.url + "/accounts", headers={"Authorization": f"Bearer mine-{key[:8]}"}, timeout=30
        )
    assert response.status_code == 200
    assert env_file.read_text() == before


def test_with_redis_it_runs_the_compose_commands() -> None:
    commands = {name: argv[1:] for name, argv in stack_commands("0.0.0.0", 8000).items()}
    assert commands["api"] == ["-m", *DESIGN_COMMANDS["api"].split()]
    assert commands["beat"] == ["-m", *DESIGN_COMMANDS["celery-beat"].split()]
    assert commands["watcher"] == DESIGN_COMMANDS["watcher"].split()[1:]
    # compose's two pools as two processes, each with its own node name on this host.
    for name, service in (("worker", "celery-worker"), ("processor", "celery-processor")):
        assert commands[name] == ["-m", *DESIGN_COMMANDS[service].split(), "-n", f"{name}@%h"]


def _children(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def test_a_busy_port_is_named_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stopped:
            main(["run", "--port", str(port)])
        with pytest.raises(SystemExit) as flower_stopped:
            main(["run", "--port", str(free_port()), "--flower", "--flower-port", str(port)])
    message = str(stopped.value.code)
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in message
    assert f"RUN_ARGS='--port {port + 1}'" in message
    message = str(flower_stopped.value.code)
    assert f"cannot start Flower on 127.0.0.1:{port}: Address already in use" in message
    assert f"RUN_ARGS='--flower-port {port + 1}'" in message
    # It stopped first: no .env written, no migration, no child process.
    assert list(tmp_path.iterdir()) == []


def test_a_missing_database_is_named_with_the_command_that_creates_it(
    set_env: Callable[..., None], database_url: str
) -> None:
    missing = f"mailbeat_missing_{uuid.uuid4().hex[:8]}"
    set_env(DATABASE_URL=database_url.rsplit("/", 1)[0] + f"/{missing}")
    with pytest.raises(SystemExit) as stopped:
        main(["migrate"])
    message = str(stopped.value.code)
    assert message.startswith(f'mailbeat: PostgreSQL at 127.0.0.1:5432 has no database "{missing}"')
    assert f"createdb -h 127.0.0.1 -p 5432 -U postgres {missing}" in message
    assert "Traceback" not in message and len(message.splitlines()) <= 4

    set_env(DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/mailbeat")
    with pytest.raises(SystemExit) as refused:
        main(["migrate"])
    assert "does not answer" in str(refused.value.code)
    assert "Start PostgreSQL" in str(refused.value.code)
