"""Freshness: a scheduled mailbox whose last complete poll (or, never polled, its
creation) is older than its freshness limit is *stale*. The limit is FRESHNESS_INTERVALS
times its poll interval, at least FRESHNESS_FLOOR_SECONDS.

Whatever stopped its polls (a worker gone, a lock held, a poll failing every time, a
schedule entry lost), the mailbox shows in /health, /admin/capacity, the metrics and the
console; `check` (periodic, `freshness.check`) marks it on the account (`stale_since`)
and sends `account.stale` once, and `account.fresh` once a complete poll brings it back.
The marking is one UPDATE ... RETURNING per direction, so two checks at once announce a
change once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Float, case, cast, func, select, update
from sqlalchemy.orm import Session

from backend import dispatch
from backend.accounts import state
from backend.config import get_settings
from backend.db import epoch, session_scope
from backend.models import Account, EventType, utcnow
from backend.schedules.service import wanted_clause
from backend.webhooks import service as webhooks

CHECK_TASK = "freshness.check"


def limit_seconds(poll_interval_seconds: int) -> float:
    settings = get_settings()
    return max(
        settings.freshness_intervals * poll_interval_seconds,
        float(settings.freshness_floor_seconds),
    )


def _last_complete(session: Session) -> ColumnElement[float]:
    """When the account was last polled completely, in epoch seconds (its creation if
    never: it has been waiting since then)."""
    return cast(epoch(session, func.coalesce(Account.last_success_at, Account.created_at)), Float)


def _limit() -> ColumnElement[float]:
    settings = get_settings()
    scaled = cast(Account.poll_interval_seconds, Float) * settings.freshness_intervals
    floor = float(settings.freshness_floor_seconds)
    return case((scaled > floor, scaled), else_=floor)


def _stale_clause(session: Session, now: datetime) -> ColumnElement[bool]:
    return wanted_clause() & (_last_complete(session) + _limit() < now.timestamp())


@dataclass
class Staleness:
    stale: int
    # The stale mailbox polled completely longest ago, and how long ago (seconds).
    worst_account_id: int | None = None
    worst_seconds: float | None = None
    worst_limit_seconds: float | None = None


def staleness(session: Session, now: datetime | None = None) -> Staleness:
    """How many scheduled mailboxes are stale now, and the worst (one aggregate query
    and one row)."""
    now = now or utcnow()
    clause = _stale_clause(session, now)
    stale = session.scalar(select(func.count(Account.id)).where(clause)) or 0
    if not stale:
        return Staleness(stale=0)
    last = _last_complete(session)
    worst = session.execute(
        select(Account.id, last, Account.poll_interval_seconds)
        .where(clause)
        .order_by(last, Account.id)
        .limit(1)
    ).one()
    return Staleness(
        stale=int(stale),
        worst_account_id=worst[0],
        worst_seconds=round(now.timestamp() - float(worst[1]), 1),
        worst_limit_seconds=limit_seconds(worst[2]),
    )


def check(now: datetime | None = None) -> dict[str, list[int]]:
    """Mark the mailboxes that turned stale and send `account.stale` for each; clear
    those polled completely since (or no longer scheduled) and send `account.fresh` for
    each that is polled again. Returns the account ids by event."""
    now = now or utcnow()
    delivery_ids: list[int] = []
    with session_scope() as session:
        turned_stale = list(
            session.scalars(
                update(Account)
                .where(Account.stale_since.is_(None), _stale_clause(session, now))
                .values(stale_since=now)
                .returning(Account.id)
                .execution_options(synchronize_session=False)
            )
        )
        recovered = list(
            session.scalars(
                update(Account)
                .where(Account.stale_since.is_not(None), ~_stale_clause(session, now))
                .values(stale_since=None)
                .returning(Account.id)
                .execution_options(synchronize_session=False)
            )
        )
        fresh: list[int] = []
        for account in session.scalars(select(Account).where(Account.id.in_(turned_stale))):
            delivery_ids += webhooks.create_account_event(session, account, EventType.ACCOUNT_STALE)
        for account in session.scalars(select(Account).where(Account.id.in_(recovered))):
            if not state.wants_polls(account):
                continue  # disabled, not polled again: account.disabled said so
            fresh.append(account.id)
            delivery_ids += webhooks.create_account_event(session, account, EventType.ACCOUNT_FRESH)
    webhooks.dispatch(delivery_ids)
    return {str(EventType.ACCOUNT_STALE): turned_stale, str(EventType.ACCOUNT_FRESH): fresh}


dispatch.register(CHECK_TASK, check)
