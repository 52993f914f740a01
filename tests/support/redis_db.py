"""A Redis database index of our own, so parallel test runs never see each other's keys."""

from __future__ import annotations

import os
import uuid

import redis

REDIS_HOST = os.environ.get("MAILBEAT_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("MAILBEAT_TEST_REDIS_PORT", "6379"))
# Claims live in db 0; db 1..15 are handed out to test sessions.
CLAIM_TTL_SECONDS = 4 * 3600


class RedisDb:
    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.index: int | None = None
        self._admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=5)

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.index}"

    def claim(self) -> RedisDb:
        for index in range(1, 16):
            if self._admin.set(
                f"mailbeat-test-claim:{index}", self.token, nx=True, ex=CLAIM_TTL_SECONDS
            ):
                self.index = index
                self.client().flushdb()
                return self
        raise RuntimeError("every Redis database 1..15 is claimed by another test session")

    def client(self) -> redis.Redis:
        assert self.index is not None
        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.index, socket_timeout=5)

    def release(self) -> None:
        if self.index is None:
            return
        self.client().flushdb()
        key = f"mailbeat-test-claim:{self.index}"
        if self._admin.get(key) == self.token.encode():
            self._admin.delete(key)
        self.index = None
