"""Looking at the database after each commit the code under test makes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import event
from sqlalchemy.orm import Session


@contextmanager
def after_each_commit(look: Callable[[Session], None]) -> Iterator[None]:
    """Call `look` after every commit of any session, while inside."""
    event.listen(Session, "after_commit", look)
    try:
        yield
    finally:
        event.remove(Session, "after_commit", look)
