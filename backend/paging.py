"""A page of a list in id order, as cheap on its last page as on its first.

A list's page is `limit` rows, after the cursor `after` (an id: the previous page's
`next_after`) and `offset` rows further. A plain OFFSET makes the database read every
row it skips, 100,000 wide account rows for the last page of 100,000 mailboxes; here the
page's first id is found by an index-only scan over the list's ids (each list has an
index on its filter and id, see backend/models), and only the page's rows are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from pydantic import Field
from sqlalchemy import BigInteger, Select, func, literal, select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")

# A list response's cursor field.
NextAfter = Annotated[
    int | None,
    Field(description="pass as `after` for the next page; null on the last page"),
]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int  # the whole list's length, whatever the cursor
    next_after: int | None  # the cursor of the next page; None on the last


def page(
    session: Session,
    query: Select[T],
    id_column: InstrumentedAttribute[Any],
    *,
    limit: int,
    offset: int = 0,
    after: int | None = None,
    newest_first: bool = False,
    within: tuple[InstrumentedAttribute[Any], Any] | None = None,
    total: int | None = None,
) -> Page[T]:
    """The page of `query` (a select with its filters, in no order): in id order, or
    newest (highest id) first, when `after` means below. `total` is counted unless given.

    `within` (column, value): the list is the rows whose column holds the value (an
    account's, a status's), the column leading the list's index. It is written as a
    range and ordered by too: with `column = value` and ORDER BY id the planner may walk
    the primary key backwards past every other account's rows, expecting to meet this
    one's soon (140 ms instead of 0.1 ms for a mailbox holding the oldest fifth of
    500,000 messages); a range is not folded into a constant, so only the list's index
    gives that order."""
    if within is not None:
        column, value = within
        query = query.where(column >= value, column <= value)
    if total is None:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if after is not None:
        # As a 64-bit value whatever the column: a cursor past the largest 32-bit id (an
        # account's) is a place in the list, not an error of the database.
        cursor = literal(after, BigInteger())
        query = query.where(id_column < cursor if newest_first else id_column > cursor)
    columns = [id_column] if within is None else [within[0], id_column]
    order = [c.desc() if newest_first else c.asc() for c in columns]
    if offset:
        first = query.with_only_columns(id_column).order_by(*order).offset(offset).limit(1)
        bound = first.scalar_subquery()
        query = query.where(id_column <= bound if newest_first else id_column >= bound)
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)).all())
    items = rows[:limit]
    next_after = None
    if len(rows) > limit:
        last = items[-1]
        next_after = last if isinstance(last, int) else getattr(last, id_column.key)
    return Page(items, total, next_after)
