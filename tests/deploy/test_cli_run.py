"""`make run` (python -m backend.cli run) on a fresh checkout, as a real process."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from backend.cli import stack_commands
from tests.deploy.files import DESIGN_COMMANDS, ROOT
from tests.support.net import free_port, wait_for_port


def _fresh_machine_env(home: Path, **extra: str) -> dict[str, str]:
    """Only what a shell on a new laptop has: none of the test bed's settings."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.e2e
def test_without_redis_it_serves_the_api_in_local_mode(tmp_path: Path) -> None:
    port, closed_port = free_port(), free_port()
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "run", "--port", str(port)],
            cwd=tmp_path,
            env=_fresh_machine_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{closed_port}/0"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, timeout=120)
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30)
        env_values = dict(
            line.split("=", 1)
            for line in (tmp_path / ".env").read_text().splitlines()
            if line and not line.startswith("#")
        )
        token = env_values["ADMIN_API_TOKEN"]
        unauthorized = httpx.get(f"http://127.0.0.1:{port}/accounts", timeout=30)
        authorized = httpx.get(
            f"http://127.0.0.1:{port}/accounts",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    output = log_path.read_text()

    assert health.status_code in (200, 503), output
    assert health.json()["checks"]["database"] == "ok"
    assert health.json()["checks"]["redis"] != "ok"
    assert unauthorized.status_code == 401
    assert authorized.status_code == 200, authorized.text
    Fernet(env_values["ENCRYPTION_KEY"].encode())
    assert "local mode" in output
    assert f"http://127.0.0.1:{port}" in output
    assert f"curl -X POST http://127.0.0.1:{port}/accounts" in output
    assert str(tmp_path / ".env") in output  # where the token is
    assert token not in output  # the token itself is never printed
    with sqlite3.connect(tmp_path / "data" / "mailbeat.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall()
    assert code == 0, output


@pytest.mark.e2e
def test_an_existing_env_file_is_kept(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    key = Fernet.generate_key().decode()
    env_file.write_text(f"ADMIN_API_TOKEN=mine-{key[:8]}\nENCRYPTION_KEY={key}\n")
    before = env_file.read_text()
    port, closed_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "run", "--port", str(port)],
        cwd=tmp_path,
        env=_fresh_machine_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{closed_port}/0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=120)
        response = httpx.get(
            f"http://127.0.0.1:{port}/accounts",
            headers={"Authorization": f"Bearer mine-{key[:8]}"},
            timeout=30,
        )
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert response.status_code == 200
    assert env_file.read_text() == before


def test_with_redis_it_runs_the_compose_commands() -> None:
    commands = {name: cmd[1:] for name, cmd in stack_commands("0.0.0.0", 8000).items()}
    assert commands["api"] == ["-m", *DESIGN_COMMANDS["api"].split()]
    assert commands["beat"] == ["-m", *DESIGN_COMMANDS["celery-beat"].split()]
    assert commands["worker"] == ["-m", *DESIGN_COMMANDS["celery-worker"].split()]
