"""When a mailbox's next poll falls: the phase of its schedule.

Both schedulers (RedBeat and the in-process one) place a new entry the same way, so
thousands of entries created at once (first deployment, a Redis that lost its keys) do
not all fire in the same second.
"""

from __future__ import annotations

from datetime import datetime, timedelta

# Knuth's multiplicative hash: consecutive ids land far apart in [0, 1).
_GOLDEN = 2654435761
_SPAN = 2**32


def spread(account_id: int) -> float:
    """A fraction in [0, 1), fixed for an account id and well spread over consecutive ids."""
    return ((account_id * _GOLDEN) % _SPAN) / _SPAN


def initial_last_run(
    account_id: int,
    interval_seconds: int,
    last_polled_at: datetime | None,
    now: datetime,
    *,
    first_poll_now: bool = False,
) -> datetime:
    """The `last_run_at` a new entry starts from.

    A mailbox polled less than an interval ago keeps that phase (its next poll is one
    interval after the last one, as if the entry had never gone). A mailbox never polled
    is due at once when `first_poll_now` (an account just created: nobody should wait an
    interval for the first mail; its phase is then the moment of that first poll).
    Otherwise its first poll falls at a point of the coming interval fixed by its id.
    """
    interval = timedelta(seconds=interval_seconds)
    if last_polled_at is not None and now - interval < last_polled_at <= now:
        return last_polled_at
    if first_poll_now and last_polled_at is None:
        return now - interval
    return now - interval + interval * spread(account_id)
