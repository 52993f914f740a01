"""The whole stack on a private Dovecot:
`python -m bench.schedule_stack [MAILBOXES] [MESSAGES] [INTERVAL] [IDLE_POLLS] [CONCURRENCY]`
(default 100 mailboxes x 100 messages, 10 s interval, 3,000 idle polls, 2 processes per
worker).

1. Ingestion: two `celery worker`s are started, the accounts created, then `celery beat`
   (which reconciles at start, spreading first polls over the interval). Reports the time
   from beat's start until every message is stored, and until every one is processed.
2. Idle polling: with everything ingested, beat and the workers are stopped, IDLE_POLLS
   polls are queued round-robin over the mailboxes (no new mail), two fresh workers
   started, and the rate is measured from the first poll's start to the last one's end
   (PollRun rows).
"""

from __future__ import annotations

import sys
import time

from sqlalchemy import func, select

from bench.stack import Stack, load_average
from tests.support.mail import generated
from tests.support.wait import wait_for


def _count(query: object) -> int:
    from backend.db import session_scope

    with session_scope() as session:
        return int(session.scalar(query) or 0)  # type: ignore[call-overload]


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    interval = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    idle_polls = int(sys.argv[4]) if len(sys.argv) > 4 else 3000
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    total = mailboxes * messages
    print(
        f"{mailboxes} mailboxes x {messages} messages, interval {interval} s, "
        f"2 workers x {concurrency} processes; {load_average()}"
    )
    with Stack(dovecot=True) as stack:
        from backend.db import session_scope
        from backend.models import Account, Message, PollRun
        from backend.schedules import service

        dovecot = stack.dovecot
        assert dovecot is not None
        raws = [generated(index) for index in range(messages)]
        print(f"message size {sum(map(len, raws)) // len(raws)} bytes on average")
        stack.add_mailboxes(lambda _index: raws, mailboxes, interval)

        workers = [stack.celery.worker(f"w{n}", concurrency) for n in (1, 2)]
        wait_for(lambda: all(" ready." in w.log() for w in workers), "workers", 120)
        started = time.monotonic()
        beat = stack.celery.beat()
        stored = select(func.count(Message.id))
        wait_for(lambda: _count(stored) == total, "every message stored", 900)
        ingest_seconds = time.monotonic() - started
        processed = select(func.count(Message.id)).where(Message.processed_at.is_not(None))
        wait_for(lambda: _count(processed) == total, "every message processed", 900)
        process_seconds = time.monotonic() - started
        print(
            f"ingestion: all {total} stored {ingest_seconds:.1f} s after beat started "
            f"({total / ingest_seconds:.0f} messages/s), all processed after "
            f"{process_seconds:.1f} s; {load_average()}"
        )

        beat.stop()
        for worker in workers:
            worker.stop()
        with session_scope() as session:
            ids = list(session.scalars(select(Account.id).order_by(Account.id)))
        task_ids = [service.enqueue_poll(ids[n % len(ids)]) for n in range(idle_polls)]
        fresh = [stack.celery.worker(f"idle{n}", concurrency) for n in (1, 2)]
        ours = PollRun.task_id.in_(task_ids)
        finished = select(func.count(PollRun.id)).where(ours, PollRun.finished_at.is_not(None))
        wait_for(lambda: _count(finished) == idle_polls, "the idle polls", 900)
        with session_scope() as session:
            first, last = session.execute(
                select(func.min(PollRun.started_at), func.max(PollRun.finished_at)).where(ours)
            ).one()
            outcomes = dict(
                session.execute(
                    select(PollRun.outcome, func.count()).where(ours).group_by(PollRun.outcome)
                ).all()
            )
        assert first is not None and last is not None
        seconds = (last - first).total_seconds()
        print(
            f"idle polling: {idle_polls} polls in {seconds:.1f} s = {idle_polls / seconds:.0f} "
            f"polls/s {outcomes}; {load_average()}"
        )
        for worker in fresh:
            worker.stop()


if __name__ == "__main__":
    main()
