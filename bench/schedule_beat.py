"""Beat at scale: `python -m bench.schedule_beat [ENTRIES] [INTERVAL] [SECONDS] [BASELINE]`
(default 10,000 entries, 60 s, 180 s; BASELINE a git revision, e.g. `391f65c`).

Creates the accounts in a fresh database, times `reconcile` (cold, unchanged, 10 % of the
intervals changed), then runs a real `celery beat` for SECONDS with no worker: a stand-in
(tests/support/poll_queue.py) takes each poll off the queue as a worker would, which
frees its coalescing key, and records its send time (the poll's sent-at header). A poll
is due one interval after the previous one was due (the phase is kept; at first, the
entry's first run). Reports dispatch lateness, duplicates, missed polls, beat CPU and memory.

With BASELINE, the cold and unchanged reconciles of that revision (checked out in a
temporary worktree, run in a subprocess on the same database and Redis, without
hiredis, as it shipped) are timed first, on the same machine and load.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from bench.stack import Stack, cpu_seconds, load_average, percentile


def _insert_accounts(count: int, interval: int) -> None:
    from sqlalchemy import insert

    from backend.db import session_scope
    from backend.models import Account

    rows = [
        {
            "email": f"bench-{index}@example.test",
            "imap_host": "127.0.0.1",
            "imap_port": 993,
            "imap_security": "ssl",
            "username": f"bench-{index}",
            "auth_method": "password",
            "credentials_encrypted": "unused",
            "folders": ["INBOX"],
            "poll_interval_seconds": interval,
            "enabled": True,
            "status": "active",
            "initial_sync": "all",
            "consecutive_failures": 0,
            "message_count": 0,
        }
        for index in range(count)
    ]
    with session_scope() as session:
        session.execute(insert(Account), rows)


def _set_interval(first_ids: int, interval: int) -> None:
    from sqlalchemy import update

    from backend.db import session_scope
    from backend.models import Account

    with session_scope() as session:
        session.execute(
            update(Account).where(Account.id <= first_ids).values(poll_interval_seconds=interval)
        )


def _reconcile() -> tuple[str, dict[str, int]]:
    """How long a reconcile took: wall time, and the CPU this process used (on a loaded
    machine the wall time is mostly waiting for a core)."""
    from backend.db import session_scope
    from backend.schedules import service

    start, cpu = time.perf_counter(), time.process_time()
    with session_scope() as session:
        result = service.reconcile(session)
    took = f"{time.perf_counter() - start:.3f} s (CPU {time.process_time() - cpu:.2f} s)"
    return took, result.as_dict()


# Run in the baseline's worktree: its reconcile, cold then unchanged, without hiredis.
_BASELINE_RECONCILE = """
import json, sys, time
sys.modules["hiredis"] = None  # the baseline shipped without it
from backend.db import session_scope
from backend.schedules import service
times = []
for _ in range(2):
    start, cpu = time.perf_counter(), time.process_time()
    with session_scope() as session:
        result = service.reconcile(session)
    took = f"{time.perf_counter() - start:.3f} s (CPU {time.process_time() - cpu:.2f} s)"
    times.append([took, result.as_dict()])
print(json.dumps(times))
"""


def _baseline_reconcile(revision: str, flush: Callable[[], object]) -> None:
    root = Path(__file__).resolve().parent.parent
    tree = Path(tempfile.mkdtemp(prefix="mailbeat-baseline-"))
    subprocess.run(
        ["git", "-C", str(root), "worktree", "add", "--detach", str(tree), revision],
        check=True,
        capture_output=True,
    )
    try:
        output = subprocess.run(
            [sys.executable, "-c", _BASELINE_RECONCILE],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for label, (took, counts) in zip(
            ("cold", "unchanged"), json.loads(output.splitlines()[-1]), strict=True
        ):
            print(f"baseline {revision} reconcile {label}: {took} {counts}")
    finally:
        subprocess.run(
            ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=True
        )
        flush()


def _memory(pid: int) -> str:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return f"RSS {status['VmRSS'].strip()}, peak {status['VmHWM'].strip()}"


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    interval = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 180
    baseline = sys.argv[4] if len(sys.argv) > 4 else None
    print(f"{entries} entries, {interval} s interval, beat for {seconds} s; {load_average()}")

    with Stack() as stack:
        _insert_accounts(entries, interval)
        if baseline:
            _baseline_reconcile(baseline, stack.redis_db.client().flushdb)
            print(load_average())
        for label in ("cold (all created)", "unchanged"):
            took, counts = _reconcile()
            print(f"reconcile {label}: {took} {counts}")
        _set_interval(entries // 10, interval * 2)
        took, counts = _reconcile()
        print(f"reconcile 10 % intervals changed: {took} {counts}")
        _set_interval(entries // 10, interval)
        took, counts = _reconcile()
        print(f"reconcile changed back: {took} {counts}")

        # A fresh schedule, spread over the interval from now, so that the run measures
        # steady dispatch rather than the backlog the reconciles above left overdue.
        stack.redis_db.client().flushdb()
        took, counts = _reconcile()
        print(f"reconcile cold again before beat: {took} {counts}")

        from backend.models import utcnow
        from backend.schedules import service
        from tests.support.poll_queue import PollSink

        first_due = {e.account_id: e.next_run_at for e in service.list_entries()}
        sink = PollSink(stack.redis_db.client()).__enter__()
        beat = stack.celery.beat()
        deadline = time.monotonic() + 120
        while "beat: Acquired lock" not in beat.log():
            if time.monotonic() > deadline or not beat.running():
                raise SystemExit(f"beat did not start:\n{beat.log()[-3000:]}")
            time.sleep(0.2)
        started_at, cpu_before = utcnow(), cpu_seconds(beat.pid)
        time.sleep(seconds)
        cpu_used = cpu_seconds(beat.pid) - cpu_before
        memory = _memory(beat.pid)
        ended_at = utcnow()
        beat.stop()
        time.sleep(1)  # the sink takes what beat sent last
        sink.__exit__(None, None, None)
        print(f"after the run: {load_average()}")

        sends = sink.sent()
        lateness: list[float] = []
        late_at: list[tuple[datetime, float]] = []
        steady: list[float] = []  # due after the first interval: start-up backlog gone
        steady_from = started_at + timedelta(seconds=interval)
        duplicates = 0
        missed = 0
        for account_id, due in first_due.items():
            times = sends.get(account_id, [])
            if due is not None and due < ended_at - timedelta(seconds=2) and not times:
                missed += 1
            previous_due = due
            for index, sent in enumerate(times):
                if index:
                    gap = (sent - times[index - 1]).total_seconds()
                    if gap < interval / 2:
                        duplicates += 1
                        continue
                    if previous_due is not None:
                        # In phase: one interval after the previous run was due, however
                        # late that one was sent.
                        previous_due += timedelta(seconds=interval)
                if previous_due is not None and previous_due >= started_at:
                    lateness.append((sent - previous_due).total_seconds())
                    late_at.append((sent, lateness[-1]))
                    if previous_due >= steady_from:
                        steady.append(lateness[-1])
        total = sum(len(times) for times in sends.values())
        print(
            f"dispatches: {total} ({total / seconds:.0f}/s); measured lateness on {len(lateness)}"
        )
        p50, p99 = percentile(lateness, 0.5), percentile(lateness, 0.99)
        worst, mean = max(lateness), statistics.mean(lateness)
        print(f"lateness: p50 {p50:.3f} s, p99 {p99:.3f} s, max {worst:.3f} s, mean {mean:.3f} s")
        if steady:
            p50, p99, worst = percentile(steady, 0.5), percentile(steady, 0.99), max(steady)
            print(
                f"after the first interval ({len(steady)} dispatches): p50 {p50:.3f} s, "
                f"p99 {p99:.3f} s, max {worst:.3f} s"
            )
        print(f"duplicates: {duplicates}; entries due but never sent: {missed}")
        late = sorted(
            ((sent, late) for sent, late in late_at if late > 1.0), key=lambda pair: pair[0]
        )
        if late:
            print(
                f"over 1 s late: {len(late)}, sent between {late[0][0]:%H:%M:%S.%f} and "
                f"{late[-1][0]:%H:%M:%S.%f}; per second: "
                f"{sorted(Counter(f'{s:%H:%M:%S}' for s, _ in late).items())[:12]}"
            )
        print(
            f"beat CPU: {cpu_used:.1f} s over {seconds} s = {100 * cpu_used / seconds:.1f} % "
            "of one core"
        )
        print(f"beat memory at the end: {memory}")
        print(f"window {started_at:%H:%M:%S}-{ended_at:%H:%M:%S} UTC")


if __name__ == "__main__":
    main()
