"""UID ranges: pure logic, no server."""

from __future__ import annotations

import pytest

from backend.mailbox.uidranges import clip, count, expand, merged, parse_set, subtract, to_ranges


def test_ranges_from_uids_and_from_a_sequence_set() -> None:
    assert to_ranges([5, 1, 2, 3, 3, 9, 10]) == [(1, 3), (5, 5), (9, 10)]
    assert to_ranges([]) == []
    # Either way round, overlapping and adjacent ranges joined.
    assert parse_set("9:7,1,2:3,4") == [(1, 4), (7, 9)]
    assert merged([(10, 12), (1, 2), (3, 5), (11, 20)]) == [(1, 5), (10, 20)]
    with pytest.raises(ValueError):
        parse_set("1:x")


def test_subtract_clip_count_expand() -> None:
    server = [(1, 100), (200, 300)]
    held = [(1, 10), (12, 99), (150, 250), (301, 400)]
    assert subtract(server, held) == [(11, 11), (100, 100), (251, 300)]
    assert subtract(server, []) == server
    assert subtract([], held) == []
    assert subtract([(5, 5)], [(1, 10)]) == []
    assert clip(server, 50, 250) == [(50, 100), (200, 250)]
    assert count(server) == 201
    assert list(expand([(1, 3), (7, 7)])) == [1, 2, 3, 7]
