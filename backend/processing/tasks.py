from __future__ import annotations

from backend.celery_app import app
from backend.db import session_scope
from backend.processing.service import process_message


@app.task(name="message.process", acks_late=True)
def process(message_id: int) -> bool:
    with session_scope() as session:
        return process_message(session, message_id)
