"""The processing steps every message goes through, in order.

A step's `run` works inside the processing transaction (it only flushes), so a message
is marked processed exactly when all its steps' rows are committed. Anything that
leaves the process (a request, a task) belongs in `after_commit`, which runs after every
processing attempt, also one that found the message already processed: the previous
attempt may have committed and died before sending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from backend.db import session_scope
from backend.models import Message
from backend.webhooks import service as webhooks


@dataclass(frozen=True)
class Handler:
    name: str
    run: Callable[[Session, Message], None]
    after_commit: Callable[[int], None] | None = None  # called with the message id


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


def _create_webhook_deliveries(session: Session, message: Message) -> None:
    webhooks.create_message_deliveries(session, message)


def _send_webhook_deliveries(message_id: int) -> None:
    with session_scope() as session:
        pending = webhooks.pending_for_message(session, message_id)
    webhooks.dispatch(pending)


register(Handler("webhook", _create_webhook_deliveries, _send_webhook_deliveries))
