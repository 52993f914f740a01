"""More polls asked for than the workers can do, on a private Dovecot:
`python -m bench.schedule_overload [MAILBOXES] [INTERVAL] [SECONDS] [WORKERS] [CONCURRENCY]
[WARMUP]`
(default 2,000 mailboxes with one message each, 10 s interval (200 polls/s asked for),
300 s, 2 workers x 4 processes (`-Q email,default`), the first 60 s not measured).

Every mailbox is polled once first, in this process (its one message stored), so the run
measures idle polls.

Beat, the workers and a watcher (`cli watch`, which holds a session for every mailbox
polled at most every HELD_INTERVAL_MAX_SECONDS: backend/push/held.py; on a tree without
held checks it has nothing to do) run for SECONDS. Every 10 s the script records the
poll queue's length, and at the end, over the measured window (WARMUP to SECONDS):
- polls/s completed (PollRun rows finished in the window), held checks/s (the checks
  that found nothing new: idle polls without a task), and the two together;
- CPU per poll or check by process kind, from /proc: beat, the workers, the watcher
  (each process with what it forked and reaped), Dovecot (its master's session), the
  bench database's PostgreSQL backends;
- how many mailboxes were never polled or checked, and the stalest mailbox's last poll
  or check (seconds before the end; since the run started if never);
- the fair bound: 2 x mailboxes / completed rate;
- a poll asked for by hand (POST /accounts/{id}/poll's path) half way: seconds until
  its poll finished.

The same arguments run on a tree without held checks (copy this file and
bench/stack.py into it): its settings below are then ignored.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select, text

from bench.stack import Stack, load_average, percentile, session_cpu_seconds
from tests.support.mail import generated
from tests.support.wait import wait_for

# The keys a tree with held checks writes (backend/schedules/store.py).
CHECKS_TOTAL = "mailbeat:held:checks"
CHECKED_PREFIX = "mailbeat:held:checked:"


def dovecot_session(root: Path) -> int:
    """The session of the Dovecot master started with this configuration."""
    conf = str(root / "dovecot.conf").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if conf in (entry / "cmdline").read_bytes():
                    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
            except OSError:
                continue
    raise RuntimeError("the bench's Dovecot is not running")


def postgres_cpu(database: str) -> float:
    """CPU seconds of the bench database's backends alive now."""
    from backend.db import session_scope

    with session_scope() as session:
        pids = session.scalars(
            text("SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": database}
        ).all()
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    interval = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    warmup = int(sys.argv[6]) if len(sys.argv) > 6 else 60
    print(
        f"{mailboxes} mailboxes x 1 message, interval {interval} s "
        f"({mailboxes / interval:.0f} polls/s asked for), {seconds} s (measured after "
        f"{warmup} s), {workers} workers x {concurrency} processes; {load_average()}"
    )
    # Every mailbox held by one watcher (and the workers' pooled sessions besides): the
    # Dovecot must take that many logged-in connections.
    settings: dict[str, object] = {
        "held_interval_max_seconds": interval,
        "watcher_max_connections": mailboxes + 100,
        "watcher_max_per_host": mailboxes + 100,
        "watcher_login_threads": 16,
    }
    connections = mailboxes + workers * concurrency * 4 + 200
    # The connection budget (backend/mailbox/budget.py, where the tree has one) gives an
    # unknown host 100 connections from all processes: the bench's Dovecot takes them all.
    settings["connection_limits"] = json.dumps({"127.0.0.1": connections})
    with Stack(dovecot=True, imap_connections=connections, **settings) as stack:
        from backend.celery_app import queue_keys
        from backend.db import session_scope
        from backend.mailbox.polling import run_poll
        from backend.models import Account, PollRun, utcnow
        from backend.schedules import service

        dovecot = stack.dovecot
        assert dovecot is not None
        stack.add_mailboxes(lambda index: [generated(index)], mailboxes, interval)
        with session_scope() as session:
            ids = list(session.scalars(select(Account.id).order_by(Account.id)))
        database = stack.database_url.rsplit("/", 1)[1]
        redis = stack.redis_db.client()
        # Idle polls are measured: every mailbox is polled once first (its message
        # stored), here, before beat starts.
        seeding = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda account_id: run_poll(account_id, None), ids))
        print(f"every mailbox polled once in {time.monotonic() - seeding:.0f} s")

        started_at = utcnow()
        started = time.monotonic()
        beat = stack.celery.beat()
        # Polls only: the seeding's message.process tasks are not what is measured.
        running = [
            stack.celery.worker(f"w{n}", concurrency, queues="email,default")
            for n in range(workers)
        ]
        watcher = stack.celery.watcher()
        kinds: dict[str, Callable[[], float]] = {
            "beat": lambda: session_cpu_seconds(beat.pid),
            "workers": lambda: sum(session_cpu_seconds(w.pid) for w in running),
            "watcher": lambda: session_cpu_seconds(watcher.pid),
            "dovecot": lambda: session_cpu_seconds(dovecot_session(dovecot.root)),
            "postgres": lambda: postgres_cpu(database),
        }
        lengths: list[int] = []
        by_hand_seconds: float | None = None
        cpu_start: dict[str, float] = {}
        checks_start = 0
        warm_at = started_at
        while time.monotonic() - started < seconds:
            until_warm = warmup - (time.monotonic() - started)
            time.sleep(10 if cpu_start or until_warm <= 0 else min(10, until_warm))
            if not cpu_start and time.monotonic() - started >= warmup:
                warm_at = utcnow()
                cpu_start = {kind: read() for kind, read in kinds.items()}
                checks_start = int(redis.get(CHECKS_TOTAL) or 0)
                print(f"measuring from {warmup} s; {load_average()}")
            lengths.append(sum(int(redis.llen(key)) for key in queue_keys("email")))
            if by_hand_seconds is None and time.monotonic() - started > seconds / 2:
                by_hand_task = service.enqueue_poll(ids[len(ids) // 2])
                asked = time.monotonic()

                def done(task_id: str = by_hand_task) -> bool:
                    with session_scope() as session:
                        return bool(
                            session.scalar(
                                select(func.count(PollRun.id)).where(
                                    PollRun.task_id == task_id, PollRun.finished_at.is_not(None)
                                )
                            )
                        )

                wait_for(done, "the poll asked for by hand", 600)
                by_hand_seconds = time.monotonic() - asked
        cpu = {kind: read() - cpu_start.get(kind, 0.0) for kind, read in kinds.items()}
        checks = int(redis.get(CHECKS_TOTAL) or 0) - checks_start
        ended_at = utcnow()
        # When each mailbox was last checked: its key's time left says (two intervals
        # plus 2 s from the check; backend/schedules/store.checked_seconds).
        with redis.pipeline(transaction=False) as pipe:
            for account_id in ids:
                pipe.pttl(f"{CHECKED_PREFIX}{account_id}")
            left = pipe.execute()
        now = time.time()
        last_checks = {
            account_id: datetime.fromtimestamp(
                now - ((2 * interval + 2) - int(ms) / 1000), tz=ended_at.tzinfo
            )
            for account_id, ms in zip(ids, left, strict=True)
            if int(ms) >= 0
        }
        beat.stop()
        for worker in running:
            worker.stop()
        watcher.stop()

        with session_scope() as session:
            completed = session.scalar(
                select(func.count(PollRun.id)).where(
                    PollRun.finished_at >= warm_at, PollRun.finished_at <= ended_at
                )
            )
            last_polls: dict[int, datetime] = {
                account_id: finished
                for account_id, finished in session.execute(
                    select(PollRun.account_id, func.max(PollRun.finished_at))
                    .where(PollRun.finished_at.is_not(None))
                    .group_by(PollRun.account_id)
                )
                if finished is not None
            }
            outcomes = dict(
                session.execute(
                    select(PollRun.outcome, func.count()).group_by(PollRun.outcome)
                ).all()
            )
        window = max((ended_at - warm_at).total_seconds(), 1.0)
        rate = (completed or 0) / window
        check_rate = checks / window
        both = rate + check_rate
        latest = {
            account_id: max(
                last_polls.get(account_id, started_at), last_checks.get(account_id, started_at)
            )
            for account_id in ids
        }
        never = [a for a in ids if a not in last_polls and a not in last_checks]
        staleness = [(ended_at - latest[a]).total_seconds() for a in ids]
        fair = 2 * mailboxes / both if both else float("inf")
        print(f"window {window:.0f} s; polls completed: {rate:.1f}/s {outcomes}")
        print(f"held checks: {check_rate:.1f}/s; polls + checks: {both:.1f}/s")
        done_count = max((completed or 0) + checks, 1)
        mailbeat = cpu["beat"] + cpu["workers"] + cpu["watcher"]
        print(
            "CPU per poll or check (ms): "
            + ", ".join(f"{kind} {1000 * value / done_count:.2f}" for kind, value in cpu.items())
            + f"; mailbeat (beat + workers + watcher) {1000 * mailbeat / done_count:.2f}"
            + f"; all {1000 * sum(cpu.values()) / done_count:.2f}"
        )
        print(
            "CPU in the window (% of one core): "
            + ", ".join(f"{kind} {100 * value / window:.0f}" for kind, value in cpu.items())
        )
        print(
            f"never polled or checked: {len(never)} of {mailboxes}; stalest mailbox: last "
            f"poll or check {max(staleness):.0f} s before the end (p50 "
            f"{percentile(staleness, 0.5):.0f} s); fair bound 2 x mailboxes / rate = {fair:.0f} s"
        )
        print(f"queue length every 10 s: {lengths}")
        print(f"poll asked for by hand: finished {by_hand_seconds:.1f} s after the request")
        print(load_average())


if __name__ == "__main__":
    main()
