"""One computation shared by every caller: what a route without a token (/health,
/metrics) computes, so that a burst of calls costs no more than one.

A result is reused for `fresh_seconds`; once it is older, the first caller computes it
again while the others get the last result rather than starting (or queueing for) their
own. Before there is any result, callers wait up to `wait_seconds` for the one in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedResult(Generic[T]):
    def __init__(
        self,
        compute: Callable[[], T],
        *,
        fresh_seconds: Callable[[], float],
        wait_seconds: Callable[[], float],
    ) -> None:
        # Callables: the settings they come from may change while the app runs (tests).
        self._compute = compute
        self._fresh_seconds = fresh_seconds
        self._wait_seconds = wait_seconds
        self._running = threading.Lock()
        self._last: T | None = None
        self._at = 0.0

    def _fresh(self) -> T | None:
        if self._last is not None and time.monotonic() - self._at < self._fresh_seconds():
            return self._last
        return None

    def get(self) -> T | None:
        """The result, or None when there is none yet and the computation in flight did
        not finish within `wait_seconds`."""
        cached = self._fresh()
        if cached is not None:
            return cached
        last = self._last
        if last is not None:
            acquired = self._running.acquire(blocking=False)
        else:
            acquired = self._running.acquire(timeout=self._wait_seconds())
        if not acquired:
            return last
        try:
            result = self._fresh() or self._compute()
            self._last, self._at = result, time.monotonic()
            return result
        finally:
            self._running.release()
