"""A stand-in for the workers when a test or benchmark counts what beat sends: it takes
every poll off the `email` queue as a worker would, which frees the poll's coalescing
key (so beat sends that mailbox's next poll when due), and records when each was sent.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import UTC, datetime
from types import TracebackType

import redis

from backend.celery_app import queue_keys
from backend.dispatch import COALESCE_HEADER, COALESCE_PREFIX
from backend.schedules.service import SENT_AT_HEADER
from backend.schedules.store import POLL_QUEUE, POLL_TASK


class PollSink:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._sent: dict[int, list[datetime]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="poll-sink", daemon=True)

    def __enter__(self) -> PollSink:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def sent(self) -> dict[int, list[datetime]]:
        """The polls taken so far, by account: when beat sent each, in order."""
        with self._lock:
            return {account_id: sorted(times) for account_id, times in self._sent.items()}

    def _drain(self) -> None:
        keys = queue_keys(POLL_QUEUE)
        while not self._stopping.is_set():
            popped = self._client.brpop(keys, timeout=0.2)
            if popped is None:
                continue
            headers = json.loads(popped[1])["headers"]
            if headers["task"] != POLL_TASK:
                continue
            coalesce_key = headers.get(COALESCE_HEADER)
            if coalesce_key:
                self._client.delete(COALESCE_PREFIX + coalesce_key)
            [account_id] = json.loads(headers["argsrepr"])
            sent = datetime.fromtimestamp(float(headers[SENT_AT_HEADER]), UTC)
            with self._lock:
                self._sent[account_id].append(sent)
