"""UIDs as compact ranges: (first, last), both included, ascending and apart.

A folder of 100,000 messages is usually one range or a few, so the audit compares what
the server holds with what is stored range by range (backend/audit/service.py), and the
server sends them as one short sequence set (`ImapSession.uid_ranges`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

UidRange = tuple[int, int]


def to_ranges(uids: Iterable[int]) -> list[UidRange]:
    """Ranges of the UIDs (in any order, repeats allowed)."""
    ranges: list[UidRange] = []
    for uid in sorted(set(uids)):
        if ranges and ranges[-1][1] + 1 == uid:
            ranges[-1] = (ranges[-1][0], uid)
        else:
            ranges.append((uid, uid))
    return ranges


def merged(ranges: Iterable[UidRange]) -> list[UidRange]:
    """Sorted, overlapping and adjacent ranges joined, each given either way round."""
    result: list[UidRange] = []
    for low, high in sorted((min(pair), max(pair)) for pair in ranges):
        if result and low <= result[-1][1] + 1:
            result[-1] = (result[-1][0], max(result[-1][1], high))
        else:
            result.append((low, high))
    return result


def parse_set(text: str) -> list[UidRange]:
    """An IMAP sequence set of numbers ("1:4,7,9:8") as ranges; ValueError if malformed."""
    pairs: list[UidRange] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        pairs.append((int(low), int(high or low)))
    return merged(pairs)


def clip(ranges: Iterable[UidRange], low: int, high: int) -> list[UidRange]:
    """The parts of the ranges within low..high."""
    return [
        (max(first, low), min(last, high))
        for first, last in ranges
        if last >= low and first <= high
    ]


def subtract(ranges: list[UidRange], taken: list[UidRange]) -> list[UidRange]:
    """What of `ranges` is not in `taken` (both as `merged` returns them)."""
    result: list[UidRange] = []
    index = 0
    for low, high in ranges:
        start = low
        while index < len(taken) and taken[index][1] < start:
            index += 1
        probe = index
        while probe < len(taken) and taken[probe][0] <= high:
            if taken[probe][0] > start:
                result.append((start, taken[probe][0] - 1))
            start = max(start, taken[probe][1] + 1)
            probe += 1
        if start <= high:
            result.append((start, high))
    return result


def count(ranges: Iterable[UidRange]) -> int:
    return sum(high - low + 1 for low, high in ranges)


def expand(ranges: Iterable[UidRange]) -> Iterator[int]:
    for low, high in ranges:
        yield from range(low, high + 1)
