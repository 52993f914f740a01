"""The one way a test waits: poll a condition until it holds, with a generous deadline.

Never a sleep that asserts timing: on a busy machine things finish late, not wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_SECONDS = 90.0


def wait_for(
    condition: Callable[[], T | None],
    what: str,
    timeout: float = DEADLINE_SECONDS,
    *,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
    hopeless: Callable[[], str | None] | None = None,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """Call `condition` until it returns something truthy; return that.

    - `details()`: read when the wait fails and added to the message (process logs).
    - `hopeless()`: checked on every round; a reason (a process that exited) fails at once.
    - `tolerate`: exceptions `condition` may raise meanwhile (a service still starting).
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        reason = hopeless() if hopeless is not None else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        value: T | None
        try:
            value = condition()
        except tolerate as exc:
            last_error, value = exc, None
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_error is not None:
                message += f" (last error: {last_error!r})"
            if details is not None:
                message += f"\n{details()}"
            raise AssertionError(message)
        time.sleep(interval)
