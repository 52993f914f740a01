"""The processing steps every message goes through, in order.

Messages are processed in batches (one `message.process` task, one transaction). A step
works inside that transaction (it only flushes), so a message is marked processed
exactly when all its steps' rows are committed. A step gives either `run`, called once
per message, or `run_batch`, called once with the batch's message ids (one statement for
the batch instead of one per message). Anything that leaves the process (a request, a
task) belongs in `after_commit` (per message id) or `after_commit_batch` (the ids), which
run after every processing attempt, also one that found the messages already processed:
the previous attempt may have committed and died before sending.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from backend.db import session_scope
from backend.models import Message
from backend.webhooks import service as webhooks


@dataclass(frozen=True)
class Handler:
    name: str
    run: Callable[[Session, Message], None] | None = None
    after_commit: Callable[[int], None] | None = None  # called with the message id
    run_batch: Callable[[Session, Sequence[int]], None] | None = None
    after_commit_batch: Callable[[Sequence[int]], None] | None = None


_registry: list[Handler] = []


def register(handler: Handler) -> None:
    """Add a step after those already registered; a name registered again is replaced
    in place."""
    for index, existing in enumerate(_registry):
        if existing.name == handler.name:
            _registry[index] = handler
            return
    _registry.append(handler)


def unregister(name: str) -> None:
    _registry[:] = [handler for handler in _registry if handler.name != name]


def registered() -> list[Handler]:
    return list(_registry)


def _send_webhook_deliveries(message_ids: Sequence[int]) -> None:
    with session_scope() as session:
        pending = webhooks.pending_for_messages(session, message_ids)
    webhooks.dispatch(pending)


register(
    Handler(
        "webhook",
        run_batch=webhooks.create_batch_deliveries,
        after_commit_batch=_send_webhook_deliveries,
    )
)
