"""Processing rate per worker process to a loopback receiver, this checkout against a
baseline commit in the same run:

    python -m bench.processing [--messages 2000] [--baseline REF] [--profile DIR]

Each variant runs in a process of its own (the "worker process": local mode, so the
`message.process` and `webhook.deliver` tasks run in it as a worker would run them), on a
fresh PostgreSQL database holding MESSAGES stored, unprocessed messages of one mailbox
(raw bytes in local files). The receiver is a process of its own too (HTTP/1.1
keep-alive, checking every signature). Timed: `hand_on(ids)` until every delivery is
recorded delivered; the rate is messages / wall-clock seconds of that process.

The baseline runs from a copy of REF (git archive; default 391f65c, main before
processing in batches) with this file's child code, which only uses what both versions
have (`hand_on`, `store_message`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def serve(port: int) -> None:
    """The receiver process."""
    from tests.support.receiver import SECRET, Receiver

    Receiver(SECRET, port=port, keep_alive=True).up()
    while True:
        time.sleep(3600)


def child(args: argparse.Namespace) -> None:
    """One variant, in the checkout on sys.path: store, then time the hand-on."""
    from tests.support.receiver import SECRET

    os.environ.update(
        WEBHOOK_SECRET=SECRET,
        DATABASE_URL=args.database_url,
        LOCAL_STORAGE_DIR=tempfile.mkdtemp(prefix="bench-processing-"),
        ENCRYPTION_KEY="Gx0PjDGsAqQw4U3mBmaXUhnSaqZ3vjxsmKdQZ0M0l7k=",
        WEBHOOK_URL=args.url,
        SCHEDULER_MODE="local",
        LOG_LEVEL="WARNING",
    )
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from backend.db import get_sessionmaker, session_scope
    from backend.models import Message, WebhookDelivery
    from backend.processing import handlers
    from backend.processing.service import hand_on
    from backend.webhooks import service as webhooks
    from tests.support.accounts import make_account
    from tests.support.webhooks import store_message

    command.upgrade(Config("alembic.ini"), "head")
    session = get_sessionmaker()()
    account = make_account(session)
    ids = [store_message(session, account, uid).id for uid in range(1, args.messages + 1)]
    session.close()
    if args.per_message_step:  # the webhook step called once per message, not per batch

        def per_message(session: Session, message: Message) -> None:
            webhooks.create_message_deliveries(session, message)

        batch_form = handlers.registered()[0]
        handlers.register(
            handlers.Handler(
                "webhook", per_message, after_commit_batch=batch_form.after_commit_batch
            )
        )
    profiler: Any = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu, start = time.process_time(), time.perf_counter()
    hand_on(ids)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    with session_scope() as session:
        delivered = session.scalar(
            select(func.count()).where(WebhookDelivery.status == "delivered")
        )
    assert delivered == args.messages, f"{delivered} of {args.messages} delivered"
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def run_variant(tree: Path, url: str, messages: int, extra: list[str], env: dict[str, str]) -> Any:
    from tests.support import postgres

    database_url = postgres.create_database("mailbeat_bench")
    try:
        output = subprocess.run(
            [
                *(sys.executable, str(Path(__file__).resolve()), "--child", "--url", url),
                *("--database-url", database_url, "--messages", str(messages), *extra),
            ],
            cwd=tree,
            env={**os.environ, **env, "PYTHONPATH": str(tree)},
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as failed:
        sys.exit(f"variant in {tree} failed:\n{failed.stderr[-3000:]}")
    finally:
        postgres.drop_database(database_url)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--baseline", default="391f65c")
    parser.add_argument("--profile", help="a directory for the cProfile dumps")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--database-url")
    parser.add_argument("--per-message-step", action="store_true")
    args = parser.parse_args()
    if args.child:
        sys.path.remove(str(Path(__file__).resolve().parent))  # bench/ is no package root
        child(args)
        return

    from bench.stack import load_average
    from tests.support.net import free_port, wait_for_port

    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=serve, args=(port,))
    receiver.start()
    baseline = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / "tree"
    baseline.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
    try:
        wait_for_port(port, timeout=120)
        url = f"http://127.0.0.1:{port}/hook"
        variants: list[tuple[str, Path, list[str], dict[str, str]]] = [
            (f"before ({args.baseline})", baseline, [], {}),
            ("after", ROOT, [], {}),
            ("after, WEBHOOK_CONCURRENCY=1", ROOT, [], {"WEBHOOK_CONCURRENCY": "1"}),
            ("after, webhook step per message", ROOT, ["--per-message-step"], {}),
        ]
        print(f"{args.messages} messages of one mailbox; {load_average()}")
        before = 0.0
        for number, (name, tree, options, env) in enumerate(variants):
            extra = list(options)
            if args.profile:
                extra += ["--profile", str(Path(args.profile) / f"{number}.prof")]
            result = run_variant(tree, url, args.messages, extra, env)
            rate = args.messages / result["seconds"]
            before = before or rate
            print(
                f"{name}: {result['seconds']:.2f} s, {rate:.0f} messages/s "
                f"({rate / before:.1f}x), {result['cpu'] / args.messages * 1000:.2f} ms CPU "
                f"per message in the worker process; {load_average()}"
            )
    finally:
        receiver.terminate()
        receiver.join()
        shutil.rmtree(baseline.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
