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
from sqlalchemy import Select, func, select
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
    total: int | None = None,
) -> Page[T]:
    """The page of `query` (a select with its filters, in no order): in id order, or
    newest (highest id) first, when `after` means below. `total` is counted unless given."""
    if total is None:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if after is not None:
        query = query.where(id_column < after if newest_first else id_column > after)
    order = id_column.desc() if newest_first else id_column.asc()
    if offset:
        first = query.with_only_columns(id_column).order_by(order).offset(offset).limit(1)
        bound = first.scalar_subquery()
        query = query.where(id_column <= bound if newest_first else id_column >= bound)
    rows = list(session.scalars(query.order_by(order).limit(limit + 1)).all())
    items = rows[:limit]
    next_after = None
    if len(rows) > limit:
        last = items[-1]
        next_after = last if isinstance(last, int) else getattr(last, id_column.key)
    return Page(items, total, next_after)
