"""Forget every cached client and setting after a test changes the environment."""

from __future__ import annotations


def reset_caches() -> None:
    from backend import crypto, db, dispatch, redis
    from backend.mailbox import budget
    from backend.schedules import service as schedules
    from backend.storage import service as storage
    from backend.webhooks import client as webhook_client

    db.reset_caches()
    crypto.reset_cache()
    storage.reset_cache()
    webhook_client.reset_cache()
    redis.reset_cache()
    schedules.reset_cache()
    dispatch.reset()
    budget.reset()
