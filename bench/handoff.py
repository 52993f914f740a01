"""Stored and handed on through the whole stack, on a private Dovecot:
`python -m bench.handoff [MAILBOXES] [MESSAGES] [INTERVAL] [POLL_PROCESSES] [PROCESSORS]`
(default 100 mailboxes x 100 messages, 10 s interval, a poll worker of 2 processes and a
processor of 1 process).

The two pools as compose runs them: `celery worker -Q email` (polls) and `celery worker
-Q workflow,default` (processing, webhooks); a receiver on loopback in a process of its
own (HTTP/1.1 keep-alive, checking every signature). The accounts are created, then
`celery beat` starts (it spreads first polls over the interval). Reports the time from
beat's start until every message is stored, processed, and delivered to the receiver.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

from sqlalchemy import func, select

from bench.processing import serve
from bench.stack import Stack, load_average
from tests.support.mail import generated
from tests.support.net import free_port, wait_for_port
from tests.support.receiver import SECRET
from tests.support.wait import wait_for


def _count(query: object) -> int:
    from backend.db import session_scope

    with session_scope() as session:
        return int(session.scalar(query) or 0)  # type: ignore[call-overload]


def main() -> None:
    mailboxes = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    interval = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    pollers = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    processors = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    total = mailboxes * messages
    print(
        f"{mailboxes} mailboxes x {messages} messages, interval {interval} s, a poll worker "
        f"of {pollers} and a processor of {processors} processes; {load_average()}"
    )
    port = free_port()
    receiver = multiprocessing.get_context("spawn").Process(target=serve, args=(port,))
    receiver.start()
    try:
        wait_for_port(port, timeout=120)
        with Stack(
            dovecot=True, webhook_url=f"http://127.0.0.1:{port}/hook", webhook_secret=SECRET
        ) as stack:
            from backend.models import Message, WebhookDelivery

            raws = [generated(index) for index in range(messages)]
            stack.add_mailboxes(lambda _index: raws, mailboxes, interval)
            workers = [
                stack.celery.worker("poller", pollers, queues="email"),
                stack.celery.worker("processor", processors, queues="workflow,default"),
            ]
            wait_for(lambda: all(" ready." in w.log() for w in workers), "workers", 120)
            started = time.monotonic()
            stack.celery.beat()
            stored = select(func.count(Message.id))
            wait_for(lambda: _count(stored) == total, "every message stored", 900)
            stored_seconds = time.monotonic() - started
            processed = select(func.count(Message.id)).where(Message.processed_at.is_not(None))
            wait_for(lambda: _count(processed) == total, "every message processed", 900)
            processed_seconds = time.monotonic() - started
            delivered = select(func.count(WebhookDelivery.id)).where(
                WebhookDelivery.status == "delivered"
            )
            wait_for(lambda: _count(delivered) == total, "every message delivered", 900)
            delivered_seconds = time.monotonic() - started
            print(
                f"all {total} stored {stored_seconds:.1f} s after beat started, processed "
                f"after {processed_seconds:.1f} s, delivered (handed on) after "
                f"{delivered_seconds:.1f} s ({total / delivered_seconds:.0f} messages/s); "
                f"{load_average()}"
            )
    finally:
        receiver.terminate()
        receiver.join()


if __name__ == "__main__":
    main()
