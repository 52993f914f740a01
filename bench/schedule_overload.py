"""More polls asked for than the workers can do, on a private Dovecot:
`python -m bench.schedule_overload [MAILBOXES] [INTERVAL] [SECONDS] [WORKERS] [CONCURRENCY]`
(default 2,000 mailboxes with one message each, 10 s interval (200 polls/s asked for),
300 s, 2 workers x 4 processes).

Beat and the workers run for SECONDS. Every 10 s the script records the poll queue's
length, and at the end:
- polls/s completed (PollRun rows finished during the run, after the first interval);
- how many mailboxes were never polled, and the stalest mailbox's last poll (seconds
  since its last finished poll, or since the run started if it never was);
- the fair bound: 2 x mailboxes / completed rate (a round-robin visits every mailbox
  once per mailboxes / rate seconds);
- a poll asked for by hand (POST /accounts/{id}/poll's path) while the queue is long:
  seconds until its poll finished.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta

from sqlalchemy import func, select

from bench.stack import Stack, load_average, percentile
from tests.support.mail import generated
from tests.support.wait import wait_for


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    interval = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    print(
        f"{mailboxes} mailboxes x 1 message, interval {interval} s "
        f"({mailboxes / interval:.0f} polls/s asked for), {seconds} s, "
        f"{workers} workers x {concurrency} processes; {load_average()}"
    )
    with Stack(dovecot=True) as stack:
        from backend.celery_app import queue_keys
        from backend.db import session_scope
        from backend.models import Account, PollRun, utcnow
        from backend.schedules import service

        dovecot = stack.dovecot
        assert dovecot is not None
        stack.add_mailboxes(lambda index: [generated(index)], mailboxes, interval)
        with session_scope() as session:
            ids = list(session.scalars(select(Account.id).order_by(Account.id)))

        started_at = utcnow()
        started = time.monotonic()
        beat = stack.celery.beat()
        running = [stack.celery.worker(f"w{n}", concurrency) for n in range(workers)]
        redis = stack.redis_db.client()
        lengths: list[int] = []
        by_hand_seconds: float | None = None
        by_hand_task = None
        while time.monotonic() - started < seconds:
            time.sleep(10)
            lengths.append(sum(int(redis.llen(key)) for key in queue_keys("email")))
            if by_hand_task is None and time.monotonic() - started > seconds / 2:
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
        ended_at = utcnow()
        beat.stop()
        for worker in running:
            worker.stop()

        with session_scope() as session:
            warm = started_at + timedelta(seconds=interval)
            completed = session.scalar(
                select(func.count(PollRun.id)).where(
                    PollRun.finished_at >= warm, PollRun.finished_at <= ended_at
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
        rate = (completed or 0) / max((ended_at - warm).total_seconds(), 1.0)
        never = [account_id for account_id in ids if account_id not in last_polls]
        staleness = [
            (ended_at - last_polls.get(account_id, started_at)).total_seconds()
            for account_id in ids
        ]
        fair = 2 * mailboxes / rate if rate else float("inf")
        print(f"polls completed: {rate:.1f}/s {outcomes}")
        print(
            f"never polled: {len(never)} of {mailboxes}; stalest mailbox: last poll "
            f"{max(staleness):.0f} s before the end (p50 {percentile(staleness, 0.5):.0f} s); "
            f"fair bound 2 x mailboxes / rate = {fair:.0f} s"
        )
        print(f"queue length every 10 s: {lengths}")
        print(f"poll asked for by hand: finished {by_hand_seconds:.1f} s after the request")
        print(load_average())


if __name__ == "__main__":
    main()
