"""The local scheduler's limits: `python -m bench.schedule_local [INTERVAL] [SECONDS] N...`
(default 60 s, 90 s, 1,000 5,000 10,000 20,000 mailboxes).

For each N, runs schedules/local.py's scheduler alone in this process (no database, no
Redis) with N mailboxes at INTERVAL and a poll that does nothing but note when it ran,
for SECONDS: how late each poll starts against when it was due (its first run, then one
interval after the previous start) and how much CPU the process used. Real polls add
their own time on top (4 threads); this is what the scheduler itself carries.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

from bench.stack import load_average, percentile


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(count: int, interval: int, seconds: int) -> None:
    from backend.models import utcnow
    from backend.schedules.local import LocalScheduler
    from backend.schedules.store import Wanted

    wanted = {account_id: Wanted(account_id, interval, None) for account_id in range(1, count + 1)}
    started: dict[int, list[datetime]] = defaultdict(list)
    guard = threading.Lock()

    def poll(account_id: int, task_id: str, force: bool) -> None:
        now = utcnow()
        with guard:
            started[account_id].append(now)

    scheduler = LocalScheduler(poll=poll, load=lambda: wanted, refresh_seconds=3600)
    cpu_before = _cpu_seconds()
    scheduler.start()
    first_due = {entry.account_id: entry.next_run_at for entry in scheduler.entries()}
    begun = utcnow()
    time.sleep(seconds)
    ended = utcnow()
    scheduler.stop()
    cpu = _cpu_seconds() - cpu_before

    lateness: list[float] = []
    missed = 0
    for account_id, due in first_due.items():
        times = started.get(account_id, [])
        if due is not None and due < ended - timedelta(seconds=2) and not times:
            missed += 1
        for index, when in enumerate(times):
            expected = due if index == 0 else times[index - 1] + timedelta(seconds=interval)
            if expected is not None and expected >= begun:
                lateness.append((when - expected).total_seconds())
    polls = sum(len(times) for times in started.values())
    if not lateness:
        print(f"{count} mailboxes: no poll measured")
        return
    print(
        f"{count} mailboxes at {interval} s ({count / interval:.0f} polls/s asked): "
        f"{polls} polls in {seconds} s ({polls / seconds:.0f}/s); lateness p50 "
        f"{percentile(lateness, 0.5):.3f} s, p99 {percentile(lateness, 0.99):.3f} s, max "
        f"{max(lateness):.3f} s; due but never run {missed}; CPU "
        f"{100 * cpu / seconds:.0f} % of one core; {load_average()}",
        flush=True,
    )


def main() -> None:
    interval = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 90
    counts = [int(arg) for arg in sys.argv[3:]] or [1_000, 5_000, 10_000, 20_000]
    print(f"{load_average()}")
    for count in counts:
        run(count, interval, seconds)


if __name__ == "__main__":
    main()
