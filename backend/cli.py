"""Command line: `python -m backend.cli run|migrate|poll|watch`, and the operator's commands
(accounts, status, schedules, dead-letters, backfill) from backend/console/commands.py."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

import uvicorn

from backend import dispatch, serving
from backend.config import Settings, get_settings
from backend.console.commands import add_commands, poll, run_command
from backend.db import DatabaseUnavailable, check_database, reset_caches
from backend.envfile import ensure_env_file
from backend.models.enums import SchedulerMode
from backend.push.watcher import watch

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = Path(".env")  # where Settings reads it: the working directory

# The compose services' commands (docs/architecture.md, "Processes and commands"), run by
# `run` when Redis answers. Two worker pools, so polls never wait behind a processing
# backlog for a slot.
WORKER_QUEUES = {"worker": "email", "processor": "workflow,default"}
STOP_TIMEOUT_SECONDS = 30.0

log = logging.getLogger("mailbeat")


def migrate() -> None:
    # Only `migrate` (and `run`) need alembic: ~100 modules, 0.3 s on every other command
    # (python -X importtime on a loaded 2-core machine).
    from alembic import command  # noqa: PLC0415 - start-up cost, above
    from alembic.config import Config  # noqa: PLC0415 - start-up cost, above

    check_database()  # a missing database is named, with the command that creates it

    config = Config(str(ROOT / "alembic.ini"))
    # alembic.ini's logging setup would silence mailbeat's own INFO lines for the rest of `run`.
    config.attributes["configure_logger"] = False
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # start-up noise
    command.upgrade(config, "head")


def stack_commands(host: str, port: int) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "api": [
            *(python, "-m", "uvicorn", "backend.main:app", "--host", host, "--port", str(port)),
            *("--http", serving.PROTOCOL),
        ],
        "beat": [python, "-m", "celery", "-A", "backend.celery_app", "beat"],
        "watcher": [python, "-m", "backend.cli", "watch"],
        **{
            # Distinct node names: two workers on one host would otherwise both be celery@host.
            name: [
                python,
                "-m",
                "celery",
                "-A",
                "backend.celery_app",
                "worker",
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
            ]
            for name, queues in WORKER_QUEUES.items()
        },
    }


def served_url(host: str, port: int) -> str:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - compared, not bound
    return f"http://{shown_host}:{port}"


def banner(settings: Settings, host: str, port: int, mode: str) -> str:
    url = served_url(host, port)
    if settings.admin_api_token is not None and settings.admin_api_token.get_secret_value():
        where = f"ADMIN_API_TOKEN in {ENV_FILE.resolve()}"
        token = f"$(sed -n 's/^ADMIN_API_TOKEN=//p' {ENV_FILE})"
    else:
        path = settings.data_dir / "dev-admin-token"
        where = f"{path.resolve()} (ADMIN_API_TOKEN is not set)"
        token = f"$(cat {path})"
    body = (
        '{"email": "me@example.com", "imap_host": "imap.example.com", "imap_port": 993, '
        '"imap_security": "ssl", "username": "me@example.com", "password": "app-password"}'
    )
    return "\n".join(
        [
            "",
            f"mailbeat is starting ({mode})",
            f"  API:        {url}   (docs: {url}/docs, health: {url}/health)",
            f"  console:    {url}/ui/",
            f"  admin token: {where}",
            "  add a first mailbox:",
            f'    curl -X POST {url}/accounts -H "Authorization: Bearer {token}" \\',
            f"      -H 'Content-Type: application/json' -d '{body}'",
            "  stop: Ctrl-C",
            "",
        ]
    )


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def supervise(commands: dict[str, list[str]]) -> int:
    """Run the processes until one exits or we are interrupted; then stop them all."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        for name, command in commands.items():
            processes[name] = subprocess.Popen(command)  # noqa: S603 - our own commands
        while True:
            exited = {name: p.returncode for name, p in processes.items() if p.poll() is not None}
            if exited:
                log.error("%s exited (%s); stopping the others", ", ".join(exited), exited)
                code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping %s", ", ".join(processes))
    finally:
        stop_all(list(processes.values()))
    return code


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    # SIGTERM is a warm shutdown for Celery (running polls finish) and a graceful one for
    # uvicorn; only what ignores it for STOP_TIMEOUT_SECONDS is killed.
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def busy_port(host: str, port: int) -> str | None:
    """Why `port` cannot be served on `host`, or None when it is free."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As uvicorn binds: a port in TIME_WAIT after a restart is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def run(host: str, port: int, flower_port: int | None = None) -> None:
    """`make run`: a working service from a fresh checkout; with `flower_port`, Flower
    too (Celery mode only)."""
    # Before anything starts: a busy port used to show only after beat and the worker ran.
    for what, wanted in (("cannot serve on", port), ("cannot start Flower on", flower_port)):
        problem = None if wanted is None else busy_port(host, wanted)
        if wanted is not None and problem is not None:
            option = "--port" if wanted == port else "--flower-port"
            raise SystemExit(
                f"mailbeat: {what} {host}:{wanted}: {problem}. Stop what listens "
                f"there (e.g. `ss -ltnp 'sport = :{wanted}'`), or choose another port: "
                f"make run RUN_ARGS='{option} {wanted + 1}'"
            )
    if ensure_env_file(ENV_FILE):
        log.info("wrote %s with a generated admin token and encryption key", ENV_FILE.resolve())
        reset_caches()
    if "public_base_url" not in get_settings().model_fields_set:
        # Webhook links must point where this API really listens; the children inherit it.
        os.environ["PUBLIC_BASE_URL"] = served_url(host, port)
        reset_caches()
    settings = get_settings()
    migrate()
    # Celery when Redis answers (SCHEDULER_MODE=auto), else the in-process scheduler: the
    # same decision the API makes, which logs it.
    if dispatch.mode() == SchedulerMode.CELERY:
        commands = stack_commands(host, port)
        mode = "API, Celery beat, a poll worker, a processor and a watcher on Redis"
        if flower_port is not None:
            commands["flower"] = flower_command(host, flower_port)
            mode += f"; Flower on {served_url(host, flower_port)}"
            if settings.flower_basic_auth is not None:
                # Flower reads its login from the environment, as in compose.
                os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
        print(banner(settings, host, port, mode), flush=True)
        sys.exit(supervise(commands))

    mode = "local mode: no Redis answers, polls run in the API process"
    if flower_port is not None:
        mode += " (no Flower: it shows Celery, which local mode does not use)"
    print(banner(settings, host, port, mode), flush=True)
    # uvicorn shuts down cleanly, then re-raises Ctrl-C; a traceback would only alarm.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run("backend.main:app", host=host, port=port, http=serving.PROTOCOL)


def flower_command(host: str, port: int) -> list[str]:
    """compose's flower command, on this host's address."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "backend.celery_app",
        "flower",
        f"--port={port}",
        f"--address={host}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailbeat")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser(
        "run", help="write .env if missing, migrate, serve the API (and Celery when Redis answers)"
    )
    run_parser.add_argument("--host", default="127.0.0.1")
    run_parser.add_argument("--port", type=int, default=8000)
    run_parser.add_argument(
        "--flower", action="store_true", help="start Flower too (with Redis), on --flower-port"
    )
    run_parser.add_argument("--flower-port", type=int, default=5555)
    sub.add_parser("migrate", help="alembic upgrade head")
    poll_parser = sub.add_parser("poll", help="poll one account now, without Celery")
    poll_parser.add_argument("account_id", type=int)
    sub.add_parser("watch", help="hold IDLE connections for mailboxes with push on (needs Redis)")
    add_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "run":
            run(args.host, args.port, args.flower_port if args.flower else None)
        elif args.command == "migrate":
            migrate()
        elif args.command == "poll":
            raise SystemExit(poll(args.account_id))
        elif args.command == "watch":
            watch()
        else:
            raise SystemExit(run_command(args))
    except DatabaseUnavailable as exc:
        raise SystemExit(f"mailbeat: {exc}") from None


if __name__ == "__main__":
    main()
