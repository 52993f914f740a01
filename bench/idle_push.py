"""Push at scale: 1,000 pushed mailboxes on one watcher process.

    .venv/bin/python -m bench.idle_push [--mailboxes 1000] [--seconds 120] [--rate 1]

A private Dovecot, PostgreSQL database and Redis index (bench/stack.py), Celery beat, two
poll workers and a processor, and one watcher. Every mailbox has push on and a 300 s
interval. Once the watcher holds IDLE on all of them and the catch-up polls are done:

- at rest: the watcher's resident memory, and its CPU over --rest seconds;
- push: messages APPENDed at --rate per second to random mailboxes for --seconds;
  latency is from just before the APPEND to the row's `ingested_at`;
- baseline, same run: the same number of messages, each APPENDed and then a top-priority
  poll sent by the benchmark itself at once (`POST /accounts/{id}/poll`'s path): the
  fastest a poll can bring mail in on this machine, which push is compared with.

Figures go to docs/benchmarks.md, with the load (`uptime`) at the time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.stack import Stack, cpu_seconds, load_average, percentile
from tests.support.mail import generated

INTERVAL = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--rest", type=int, default=60)
    args = parser.parse_args()

    # One imap process per connection: room for every IDLE, the polls and the baseline.
    # All on one host and one watcher: its per-host cap (500 by default) and the host's
    # connection budget (100 for a host the provider table does not know) raised to fit.
    connections = 2 * args.mailboxes + 100
    with Stack(
        dovecot=True,
        imap_connections=connections,
        watcher_max_per_host=args.mailboxes,
        connection_limits=json.dumps({"127.0.0.1": connections}),
    ) as stack:
        from sqlalchemy import func, select

        from backend.db import session_scope
        from backend.models import Account, Message, PushStatus
        from backend.schedules import service as schedules
        from tests.support.wait import wait_for

        assert stack.dovecot is not None
        dovecot = stack.dovecot
        started = time.monotonic()
        stack.add_mailboxes(lambda _n: [], args.mailboxes, INTERVAL, push=True)
        print(f"{args.mailboxes} mailboxes in {time.monotonic() - started:.0f}s")
        with session_scope() as session:
            accounts = {
                row.id: row.username
                for row in session.execute(select(Account.id, Account.username))
            }
        celery = stack.celery
        celery.beat()
        celery.worker("w1", concurrency=2, queues="email")
        celery.worker("w2", concurrency=2, queues="email")
        celery.worker("p1", concurrency=2, queues="workflow,default")
        watcher = celery.watcher()

        def watching() -> int:
            with session_scope() as session:
                return int(
                    session.scalar(
                        select(func.count()).where(Account.push_status == PushStatus.WATCHING)
                    )
                    or 0
                )

        started = time.monotonic()
        wait_for(
            lambda: watching() == args.mailboxes,
            "IDLE on every mailbox",
            900,
            interval=1.0,
            details=celery.logs,
        )
        print(f"IDLE on {args.mailboxes} mailboxes after {time.monotonic() - started:.0f}s")

        # Let the catch-up polls and first scheduled polls drain before measuring rest.
        def queued() -> int | None:
            with session_scope() as session:
                return schedules.capacity(session).queue_length

        wait_for(lambda: queued() == 0, "an empty queue", 600)
        time.sleep(10)

        rest_cpu = cpu_seconds(watcher.pid)
        time.sleep(args.rest)
        rest_cpu = (cpu_seconds(watcher.pid) - rest_cpu) / args.rest
        rest_rss = rss_mb(watcher.pid)
        print(
            f"at rest: watcher RSS {rest_rss:.0f} MB, CPU {rest_cpu * 100:.2f}% of a core; "
            f"{load_average()}"
        )

        def run(label: str, poll_at_once: bool) -> list[float]:
            sent: dict[tuple[int, int], float] = {}
            ids = list(accounts)
            count = int(args.seconds * args.rate)
            begin = time.monotonic()
            for index in range(count):
                due = begin + index / args.rate
                time.sleep(max(0.0, due - time.monotonic()))
                account_id = random.choice(ids)
                raw = generated(index, message_id=False)
                when = time.time()
                uid = dovecot.append(accounts[account_id], raw)
                sent[(account_id, uid)] = when
                if poll_at_once:
                    schedules.enqueue_poll(account_id)

            def stored() -> dict[tuple[int, int], float]:
                with session_scope() as session:
                    rows = session.execute(
                        select(Message.account_id, Message.uid, Message.ingested_at).where(
                            Message.account_id.in_({key[0] for key in sent})
                        )
                    )
                    return {
                        (row.account_id, row.uid): row.ingested_at.timestamp()
                        for row in rows
                        if (row.account_id, row.uid) in sent
                    }

            def all_stored() -> dict[tuple[int, int], float] | None:
                now = stored()
                return now if len(now) == len(sent) else None

            found = wait_for(all_stored, label, 600, interval=0.5)
            latencies = [found[key] - sent[key] for key in sent]
            print(
                f"{label}: {len(latencies)} messages, p50 {percentile(latencies, 0.5):.3f}s, "
                f"p99 {percentile(latencies, 0.99):.3f}s, max {max(latencies):.3f}s; "
                f"{load_average()}"
            )
            return latencies

        pushed = run("push", poll_at_once=False)
        rss_after = rss_mb(watcher.pid)
        baseline = run("baseline (APPEND, then a top-priority poll)", poll_at_once=True)
        print(
            f"ratios push/baseline: p50 "
            f"{percentile(pushed, 0.5) / max(percentile(baseline, 0.5), 1e-6):.2f}, p99 "
            f"{percentile(pushed, 0.99) / max(percentile(baseline, 0.99), 1e-6):.2f}; "
            f"watcher RSS after the push run {rss_after:.0f} MB"
        )
        assert watcher.running(), watcher.log()[-3000:]


if __name__ == "__main__":
    main()
