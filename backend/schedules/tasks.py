"""`schedules.reconcile`: beat sends it every RECONCILE_INTERVAL_SECONDS (queue `default`)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init

from backend import dispatch
from backend.celery_app import app
from backend.db import session_scope
from backend.schedules import service


@app.task(name="schedules.reconcile", acks_late=True)
def reconcile() -> dict[str, int]:
    with session_scope() as session:
        return service.reconcile(session).as_dict()


@worker_init.connect
def _worker_mode(**_kwargs: Any) -> None:
    dispatch.assume_celery_mode()
