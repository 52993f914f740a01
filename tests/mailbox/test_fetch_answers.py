"""FETCH answers read by regular expressions (`imap.read_metas`, `imap.read_bodies`)
agree with imapclient's parser on every answer, or step aside for it."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from backend.mailbox.imap import (
    _read_bodies_fast,
    _read_bodies_parsed,
    _read_metas_fast,
    _read_metas_parsed,
    read_bodies,
    read_metas,
)

# Items as servers send them, and odd ones: quoted or numeric flags, NIL, literals'
# markers, Gmail's items, dates out of range or in other shapes, MODSEQ, spacing.
ITEMS = [
    "UID 7",
    "UID 4294967295",
    "UID 0",
    "RFC822.SIZE 1234",
    "rfc822.size 0",
    "FLAGS ()",
    "FLAGS (\\Seen)",
    "FLAGS (\\Seen \\Flagged $Label1 \\Recent)",
    "FLAGS (  \\Seen   \\Answered )",
    "FLAGS (NIL 12 012 \\recent Junk)",
    'FLAGS ("quoted")',
    "FLAGS ({3}",
    "FLAGS (a[b])",
    "FLAGS (\\Seen\t\\Deleted)",
    'INTERNALDATE "23-Nov-2026 10:00:00 +0100"',
    'INTERNALDATE " 3-nov-2026 23:59:59 -0830"',
    'INTERNALDATE "01-Jan-1970 00:00:00 -0000"',
    'INTERNALDATE "31-Feb-2026 10:00:00 +0000"',
    'INTERNALDATE "23-Nov-2026 25:00:00 +0000"',
    'INTERNALDATE "23-Nox-2026 10:00:00 +0000"',
    'INTERNALDATE "23-Nov-26 10:00:00 +0000"',
    'INTERNALDATE "23 Nov 2026 10:00 +0000"',
    'INTERNALDATE ""',
    "INTERNALDATE NIL",
    "MODSEQ (12345)",
    "EMAILID (M6d99ac3275bb4e)",
    "EMAILID (123)",
    "EMAILID (NIL)",
    "THREADID (T64b478a75b7ea9)",
    "THREADID NIL",
    "X-GM-MSGID 1278455344230334865",
    'X-GM-LABELS (\\Inbox "a b")',
    "BODY[] {3}",
]


def answers(rng: random.Random) -> list[bytes]:
    lines = []
    for sequence in range(1, rng.randint(1, 4) + 1):
        items = rng.sample(ITEMS, k=rng.randint(0, 6))
        if rng.random() < 0.8:
            items.insert(rng.randrange(len(items) + 1), f"UID {rng.randint(1, 9)}")
        separator = " " if rng.random() < 0.9 else "  "
        lines.append(f"{sequence} ({separator.join(items)})".encode())
    return lines


def test_read_by_expressions_as_imapclient_reads_them() -> None:
    rng = random.Random(3)
    read = 0
    for _ in range(20_000):
        data = answers(rng)
        fast = _read_metas_fast(data)
        if fast is not None:
            read += 1
            assert fast == _read_metas_parsed(data), data
    assert read > 1_000


def test_common_answers_take_the_short_way() -> None:
    dovecot = [
        b'1 (UID 5 RFC822.SIZE 2048 INTERNALDATE "07-Dec-2026 09:05:00 +0100" '
        b"FLAGS (\\Seen $Forwarded) MODSEQ (12))",
        b'2 (UID 6 RFC822.SIZE 10 FLAGS () INTERNALDATE " 1-Jan-2026 00:00:00 +0000" '
        b"EMAILID (Mab12) THREADID NIL)",
    ]
    metas = _read_metas_fast(dovecot)
    assert metas is not None
    assert metas == read_metas(dovecot) == _read_metas_parsed(dovecot)
    assert metas[5].internal_date == datetime(2026, 12, 7, 8, 5, tzinfo=UTC)
    assert metas[5].flags == ["\\Seen", "$Forwarded"]
    assert metas[6].email_id == "Mab12" and metas[6].thread_id is None
    # Nothing untagged (every UID expunged): imaplib's [None].
    assert read_metas([None]) == {}


# How imaplib holds a body FETCH's answers: (the line up to the literal, the literal),
# then the rest of the line; with the UID before or after the body, twice or not at all,
# other items, other sections, unsolicited answers between them.
HEADS = [
    b"%d (UID 5 BODY[] {3}",
    b"%d (uid 6 body[] {3}",
    b"%d (BODY[] {3}",
    b"%d (UID 5 FLAGS (\\Seen) BODY[] {3}",
    b"%d (UID 7 BODY[TEXT] {3}",
    b"%d (UID 8 BODY[]<0> {3}",
]
TAILS = [b")", b" UID 5)", b" uid 9)", b" FLAGS (\\Seen))", b" UID 6 FLAGS ())", b"))"]
ODD = [None, b"%d (UID 7 FLAGS (\\Seen))", b"%d (UID 5)"]


def test_bodies_read_by_expressions_as_imapclient_reads_them() -> None:
    rng = random.Random(5)
    read = 0
    for _ in range(20_000):
        data: list[object] = []
        for sequence in range(1, rng.randint(1, 4) + 1):
            if rng.random() < 0.05:
                odd = rng.choice(ODD)
                data.append(odd % sequence if odd else odd)
                continue
            literal = bytes(rng.choices(b"ab\r\n)", k=3))
            data += [(rng.choice(HEADS) % sequence, literal), rng.choice(TAILS)]
        fast = _read_bodies_fast(data)
        if fast is not None:
            read += 1
            assert fast == _read_bodies_parsed(data), data
    assert read > 300  # most random answers hold something unusual: enough do not


def test_common_body_answers_take_the_short_way() -> None:
    data = [(b"1 (UID 5 BODY[] {5}", b"a\r\nb)"), b")", (b"2 (BODY[] {0}", b""), b" UID 9)"]
    assert _read_bodies_fast(data) == read_bodies(data) == {5: b"a\r\nb)", 9: b""}
    assert read_bodies([None]) == {}
