"""Command line: `python -m backend.cli run|migrate`."""

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mailbeat")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="migrate the database and serve the API")
    run_parser.add_argument("--host", default="127.0.0.1")
    run_parser.add_argument("--port", type=int, default=8000)
    sub.add_parser("migrate", help="alembic upgrade head")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "run":
        run(args.host, args.port)
    elif args.command == "migrate":
        migrate()


if __name__ == "__main__":
    main()
