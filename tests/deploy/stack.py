"""The compose services' own commands, run as local processes (there is no Docker engine).

Each command is read from docker-compose.yml; only what lets several copies share one
host changes: ports, worker node names, and the program's path in this virtualenv.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.deploy.files import ROOT, command, service
from tests.support.dovecot import Dovecot
from tests.support.processes import stop_group

BIN = Path(sys.executable).parent
T = TypeVar("T")


def compose_command(name: str, replace: dict[str, str] | None = None, *extra: str) -> list[str]:
    """The service's command with `replace`d arguments and `extra` ones appended."""
    argv = [(replace or {}).get(arg, arg) for arg in command(name)]
    missing = set(replace or {}) - set(command(name))
    assert not missing, f"{name}'s command has no {missing}"
    return [str(BIN / argv[0]), *argv[1:], *extra]


def compose_environment(name: str) -> dict[str, str]:
    """The variables compose sets for the service (values are replaced by the caller)."""
    env = service(name).get("environment", {})
    assert isinstance(env, dict)
    return {str(key): str(value) for key, value in env.items()}


class ServiceProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                # The checkout stands for the image's /app: code, alembic.ini, migrations.
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() reaches prefork children
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (what `docker compose stop` sends), then SIGKILL after `timeout`."""
        if self.process is None:
            return None
        return stop_group(self.process, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def top_level_files() -> set[str]:
    """What is in the checkout's top level: in the image /app is read-only to the service
    user, so a process that writes there (a beat schedule file, a pid file) would fail."""
    return {path.name for path in ROOT.iterdir()} - {".pytest_cache", ".mypy_cache", ".ruff_cache"}


def watched(*processes: ServiceProcess) -> dict[str, Any]:
    """wait_for's arguments for a wait on these processes: fail at once when one exits,
    show their logs on a timeout, tolerate errors from a service still starting."""

    def exited() -> str | None:
        dead = [p for p in processes if not p.running()]
        return "\n".join(f"exited: --- {p.name}\n{p.log()[-4000:]}" for p in dead) or None

    def tails() -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.log().splitlines()[-40:]) for p in processes
        )

    return {"hopeless": exited, "details": tails, "tolerate": (Exception,), "interval": 0.5}


def email(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "sender@example.com"
    message["To"] = "inbox@example.com"
    message["Subject"] = subject
    message["Message-ID"] = f"<{uuid.uuid4().hex}@example.com>"
    message.set_content(f"body of {subject}\n")
    return message.as_bytes()


def account_body(
    dovecot: Dovecot, username: str, *, ssl: bool, interval: int = 10
) -> dict[str, object]:
    """POST /accounts for a Dovecot fixture user: implicit TLS, or plain IMAP."""
    return {
        "email": f"{username}@example.com",
        "imap_host": dovecot.host,
        "imap_port": dovecot.imaps_port if ssl else dovecot.imap_port,
        "imap_security": "ssl" if ssl else "none",
        "username": username,
        "password": dovecot.passwords[username],
        "folders": ["INBOX"],
        "poll_interval_seconds": interval,
    }


class Api:
    """The admin API of a running process, with the admin token."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def create_account(self, body: dict[str, object]) -> int:
        response = self("POST", "/accounts", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def message_total(self, account_id: int) -> int:
        response = self("GET", f"/accounts/{account_id}/messages", params={"limit": 100})
        assert response.status_code == 200, response.text
        return int(response.json()["total"])

    def subjects(self, account_id: int) -> list[str]:
        response = self("GET", f"/accounts/{account_id}/messages", params={"limit": 100})
        return sorted(str(item["subject"]) for item in response.json()["items"])


def worker_names(body: Any) -> set[str]:
    """The worker names in a /admin/celery/workers answer."""
    items = body.get("workers", body) if isinstance(body, dict) else body
    workers = items.values() if isinstance(items, dict) else items
    return {str(worker["name"]) for worker in workers}
