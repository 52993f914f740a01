"""Command line: `python -m backend.cli run|migrate|poll`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backend.config import get_settings

ROOT = Path(__file__).resolve().parent.parent


def migrate() -> None:
    from alembic import command
    from alembic.config import Config

    command.upgrade(Config(str(ROOT / "alembic.ini")), "head")


def run(host: str, port: int) -> None:
    import uvicorn

    migrate()
    uvicorn.run("backend.main:app", host=host, port=port)


def poll(account_id: int) -> int:
    """Poll one account now, in this process, and hand its new messages on in-process
    (no Celery needed). Prints the result; the exit status is 0 only on success."""
    import json

    from backend import metrics
    from backend.mailbox import service
    from backend.processing.service import after_poll

    result = service.poll_account(account_id, task_id=None)
    after_poll(account_id, result.new_message_ids, result.account_event, use_celery=False)
    metrics.record_poll(result.outcome, result.messages, result.bytes, result.duration_seconds)
    summary = {
        "account_id": account_id,
        "outcome": result.outcome,
        "messages": result.messages,
        "bytes": result.bytes,
        "duration_seconds": round(result.duration_seconds, 3),
        "error": result.error,
        "account_event": result.account_event,
    }
    print(json.dumps(summary))
    return 0 if result.outcome in ("success", "skipped") and result.error is None else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailbeat")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="migrate the database and serve the API")
    run_parser.add_argument("--host", default="127.0.0.1")
    run_parser.add_argument("--port", type=int, default=8000)
    sub.add_parser("migrate", help="alembic upgrade head")
    poll_parser = sub.add_parser("poll", help="poll one account now, without Celery")
    poll_parser.add_argument("account_id", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "run":
        run(args.host, args.port)
    elif args.command == "migrate":
        migrate()
    elif args.command == "poll":
        raise SystemExit(poll(args.account_id))


if __name__ == "__main__":
    main()
