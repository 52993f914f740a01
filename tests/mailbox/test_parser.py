"""The parser on its own: decoding, safe names, and the fast path agreeing with the
feed parser on every message we have."""

from __future__ import annotations

import base64
import email.parser
import random
from datetime import UTC, datetime
from email.message import Message
from email.utils import getaddresses

import pytest

from backend.mailbox.parser import (
    MAX_SAFE_NAME,
    POLICY,
    _header_block,
    _part_bytes,
    clean_text,
    decode_words,
    parse_message,
    plain_addresses,
    safe_filename,
)
from bench.ingest import build_message
from tests.support.mail import corpus, generated


def test_rfc2047_headers_and_addresses() -> None:
    raw = (
        b"From: =?utf-8?q?Jos=C3=A9_Garc=C3=ADa?= <jose@example.org>\r\n"
        b"To: =?iso-8859-1?q?M=FCller?= <m@example.org>, plain@example.org\r\n"
        b'Cc: "Quoted, Name" <q@example.org>\r\n'
        b"Subject: =?utf-8?b?5pel5pys6Kqe?= and =?utf-8?q?caf=C3=A9?=\r\n"
        b"Date: Tue, 01 Dec 2026 08:30:00 -0500\r\n"
        b"Message-ID: <abc@example.org>\r\n"
        b"\r\n"
        b"hello\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.from_addr == "José García <jose@example.org>"
    assert parsed.to_addrs == ["Müller <m@example.org>", "plain@example.org"]
    assert parsed.cc_addrs == ["Quoted, Name <q@example.org>"]
    assert parsed.subject == "日本語 and café"
    assert parsed.date == datetime(2026, 12, 1, 13, 30, tzinfo=UTC)
    assert parsed.message_id == "<abc@example.org>"
    assert parsed.text_body == "hello\r\n"
    assert parsed.attachments == []


def test_broken_headers_degrade_instead_of_failing() -> None:
    raw = (
        b"Subject: =?x-unknown?q?abc?= \xff\xfe raw bytes\r\n"
        b"Date: not a date\r\n"
        b"From: \x00weird\r\n"
        b"Content-Type: text/plain; charset=no-such-charset\r\n"
        b"\r\n"
        b"caf\xc3\xa9 \x00 body\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.subject is not None and "raw bytes" in parsed.subject
    assert "\x00" not in (parsed.from_addr or "")
    assert parsed.date is None
    assert parsed.text_body == "café  body\r\n"
    for text in (parsed.subject, parsed.from_addr, parsed.text_body):
        assert text is not None
        text.encode("utf-8")  # valid for PostgreSQL


def test_attachments_inline_parts_and_nested_messages() -> None:
    inner = generated(7)
    raw = (
        b"Subject: parts\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
        b"preamble\r\n--outer\r\n"
        b'Content-Type: multipart/related; boundary="inner"\r\n\r\n'
        b"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>hi</p>\r\n"
        b"--inner\r\nContent-Type: image/png\r\nContent-ID: <img1>\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--inner--\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n"
        b"--outer\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename*=UTF-8''%E2%82%AC%20report%2F..%2Fx.txt\r\n"
        b"\r\npayload\r\n--outer--\r\nepilogue\r\n"
    )
    parsed = parse_message(raw)
    assert parsed.html_body == "<p>hi</p>"
    assert parsed.text_body is None
    image, message, document = parsed.attachments
    assert (image.content_type, image.content_id, image.data) == (
        "image/png",
        "<img1>",
        b"\x89PNG\r\n\x1a\n",
    )
    assert image.safe_name == "attachment-1.png"
    assert message.content_type == "message/rfc822"
    assert b"Hallo 7" in message.data
    assert document.filename == "€ report/../x.txt"
    assert document.safe_name == "x.txt"
    assert document.data == b"payload"


@pytest.mark.parametrize("boundary", ['boundary=""', "boundary=", 'boundary="  "'])
@pytest.mark.parametrize("fast", [True, False])
def test_an_attached_message_is_the_same_bytes_at_every_parse(boundary: str, fast: bool) -> None:
    """An attached message is serialized again from its parsed tree; a multipart in it
    without a usable boundary must not get a new random one each time (its content
    hash would change with every parse)."""
    inner = (
        b"Subject: inner\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; " + boundary.encode() + b"\r\n\r\n"
        b"--\r\nContent-Type: text/plain\r\n\r\nhello\r\n----\r\n"
    )
    raw = (
        b'Subject: outer\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="o"\r\n'
        b"\r\n--o\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        b"--o\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--o--\r\n"
    )
    first, second = (parse_message(raw, fast=fast).attachments for _ in range(2))
    assert [a.data for a in first] == [a.data for a in second]
    assert first[0].content_type == "message/rfc822"
    assert b"hello" in first[0].data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("..", "attachment-3.bin"),
        ("", "attachment-3.bin"),
        (None, "attachment-3.bin"),
        ("a\x00b\r\nc:d*e?.txt", "a_b_c_d_e_.txt"),
        ("  .hidden ", "hidden"),
        ("C:\\Users\\x\\évidence.doc", "évidence.doc"),
    ],
)
def test_safe_filename(name: str | None, expected: str) -> None:
    assert safe_filename(name, index=3, content_type="application/x-unknown") == expected


def test_safe_filename_is_bounded_and_keeps_the_extension() -> None:
    name = safe_filename("x" * 1000 + ".pdf", index=1, content_type="application/pdf")
    assert len(name) == MAX_SAFE_NAME
    assert name.endswith(".pdf")
    assert "/" not in name


def test_clean_text_and_decode_words() -> None:
    assert clean_text("a\x00b") == "ab"
    smuggled = b"caf\xc3\xa9".decode("ascii", "surrogateescape")
    assert clean_text(smuggled) == "café"
    assert decode_words("=?utf-8?q?=E2=9C=93?= ok") == "✓ ok"
    # Not UTF-8 in a word labelled UTF-8: the byte as windows-1252 reads it, not U+FFFD.
    assert decode_words("=?utf-8?q?=FF?=") == "ÿ"


def test_fast_path_agrees_with_the_feed_parser() -> None:
    """The regex split gives what the feed parser gives."""
    rng = random.Random(7)
    messages = [
        *corpus(),
        *(build_message(i, rng) for i in range(150)),
        generated(1, attachment=b"%PDF" * 5000),
        generated(2, message_id=False),
    ]
    for raw in messages:
        assert parse_message(raw, fast=True) == parse_message(raw, fast=False)


# Lines of a message's body: delimiters of boundaries b, c and "b c" (well-formed,
# closing, with blanks or text after them), part headers (nested multiparts, digests, no
# or an empty boundary, folded), field-less lines, 8-bit bytes, base64 and QP.
BODY_LINES = [
    *("--b", "--b--", "--b  ", "--b--x", "--bx", "--b\t", "--", "-- b"),
    *("--c", "--c--", "--b c", "--b c--"),
    *("", "", "", "hello", " folded", "\tfolded", "bad line", ":x", "From x", "X: \xe9"),
    *("\xc4\xe3\xba\xc3", "=?utf-8?q?a?=", "QUJD", "QUJ", "=E9=", "Subject: s"),
    *("Content-Type: text/plain", "Content-Type: text/html; charset=utf-8"),
    *("Content-Type: text/plain; charset=gbk", "content-type: TEXT/PLAIN"),
    *("Content-Type: text/plain; name=x.txt", "Content-ID: <x>", "MIME-Version: 1.0"),
    *("Content-Type: multipart/alternative; boundary=c", "Content-Type: multipart/mixed"),
    *('Content-Type: multipart/mixed; boundary="b"', "Content-Type: multipart/mixed; boundary="),
    *('Content-Type: multipart/mixed; boundary="b c"', "Content-Type:multipart/related;boundary=c"),
    *("Content-Type: multipart/digest; boundary=b", " boundary=b"),
    *("Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable"),
    "Content-Disposition: attachment; filename=a.txt",
]
TOP_FIELDS = [
    "Content-Type: multipart/mixed; boundary=b",
    'Content-Type: multipart/alternative; boundary="b"',
    "Content-Type: multipart/mixed;\r\n boundary=b",
    "Content-Type: MULTIPART/MIXED; BOUNDARY=b",
    "Content-Type: multipart/related; boundary=c",
    "Content-Type: text/plain",
    "Subject: x",
]


def test_fast_path_agrees_with_the_feed_parser_on_random_structures() -> None:
    """Random multipart bodies (delimiters misplaced, missing, nested, parts with odd
    headers, every line ending including a lone CR): the split gives what the feed
    parser gives, or steps aside."""
    rng = random.Random(5)
    for _ in range(5_000):
        lines = [
            rng.choice(TOP_FIELDS),
            *rng.choices(BODY_LINES[8:], k=rng.randint(0, 3)),
            "",
            *rng.choices(BODY_LINES, k=rng.randint(0, 25)),
        ]
        if rng.random() < 0.5:
            ending = rng.choice(["\r\n", "\n"])
            text = ending.join(lines) + (ending if rng.random() < 0.7 else "")
        else:
            endings = ["\r\n", "\n", " \r\n", "\t\n", "\r"]
            text = "".join(line + rng.choice(endings) for line in lines)
        raw = text.encode("latin-1")
        assert parse_message(raw, fast=True) == parse_message(raw, fast=False), repr(raw)


# Pieces of header lines: names (with spaces, empty, "From "), colons, values, folding,
# blank continuations, 8-bit bytes (as the parser carries them), line endings.
HEADER_PIECES = [
    "Subject",
    "X-Name",
    "From ",
    "From",
    "Bad Name",
    "",
    ":",
    "::",
    " ",
    "\t",
    "value",
    " value with words",
    "=?utf-8?q?caf=C3=A9?=",
    "caf\udcc3\udca9",
    "a:b",
    "\r\n",
    "\n",
    "\r\n ",
    "\n\t",
    "\r\n  \r\n",
]


def test_header_blocks_are_read_as_the_feed_parser_reads_them() -> None:
    """Any header block (no blank line, no lone CR): the same fields, names and raw
    values as the feed parser's, or None where the feed parser finds a defect."""
    rng = random.Random(11)
    blocks = ["Subject: a\r\n b\r\n", "A: 1\nB:2\n", "X:   \r\n\tcontinued\r\n"]
    for _ in range(20_000):
        text = "".join(rng.choices(HEADER_PIECES, k=rng.randint(1, 12)))
        block = "\n".join(line for line in text.replace("\r\n", "\n").split("\n") if line)
        if not block:
            continue  # a block has a line at least: an empty one ends it
        if not rng.randrange(3):
            block = block.replace("\n", "\r\n")
        blocks.append(block + "\n")
    read = 0
    for block in blocks:
        fast = _header_block(block)
        feed = email.parser.Parser(policy=POLICY).parsestr(block, headersonly=True)
        if fast is None:
            assert feed.defects or feed.get_payload() or feed.get_unixfrom(), repr(block)
            continue
        read += 1
        assert not feed.defects and not feed.get_payload(), repr(block)
        assert fast.items() == feed.items(), repr(block)
    assert read > 1_000  # most random blocks hold a line that is no field: enough do not


@pytest.mark.parametrize(
    "payload",
    [
        base64.encodebytes(bytes(range(256)) * 40).decode(),
        base64.encodebytes(b"%PDF" * 3).decode().replace("\n", "\r\n"),
        "QUJD",  # no line break at all
        "QUJ",  # missing padding
        "QU JD\r\n",  # a stray space
        "QUJD====\n",  # too much padding
        "QUJD\nQUJD=\n",  # padding in the middle
        "QUJ\udcc3D\n",  # an 8-bit byte
        "",
    ],
)
def test_base64_parts_decode_as_get_payload_decodes_them(payload: str) -> None:
    part = Message(policy=POLICY)
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(payload)
    assert _part_bytes(part) == part.get_payload(decode=True)


def test_random_base64_text_decodes_as_get_payload_decodes_it() -> None:
    """Well-formed or not: line breaks anywhere, padding short, long or in the middle,
    characters outside the alphabet."""
    rng = random.Random(7)
    pieces = ["QUJD", "QQ", "Q", "=", "==", "\r\n", "\n", " ", "!", "-", "+/", "YWJj"]
    for _ in range(5_000):
        payload = "".join(rng.choices(pieces, k=rng.randint(0, 12)))
        part = Message(policy=POLICY)
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(payload)
        assert _part_bytes(part) == part.get_payload(decode=True), repr(payload)


# Pieces of address headers, plain and not: atoms, dots, quotes, comments, groups,
# routes, encoded words, folding, stray separators.
ADDRESS_PIECES = [
    "Ann",
    "Bo Li",
    "x",
    "a.b",
    "a..b",
    ".a",
    "@",
    "example.org",
    "mail.example.org",
    "<",
    ">",
    ",",
    ";",
    ":",
    '"',
    "\\",
    "(",
    ")",
    " ",
    "  ",
    "\t",
    "\r\n ",
    "=?GBK?B?1cXI/Q==?=",
    "=?utf-8?q?J=C3=BCrgen?=",
    "Group:",
    "[1.2.3.4]",
    "'",
    "+tag",
    "é",
    "",
]


def test_plain_addresses_agree_with_getaddresses_or_step_aside() -> None:
    """The fast path reads only what getaddresses would read the same way; on anything
    else it gives None (then getaddresses reads it)."""
    rng = random.Random(7)
    plain = 0
    for _ in range(20_000):
        values = [
            "".join(rng.choice(ADDRESS_PIECES) for _ in range(rng.randint(1, 9)))
            for _ in range(rng.choice((1, 1, 1, 2)))
        ]
        if rng.random() < 0.3:  # make many of them plain lists
            values = [
                ", ".join(
                    rng.choice(("Ann Lee <ann.lee@example.org>", "bo@mail.example.org", "x <y@z>"))
                    for _ in range(rng.randint(1, 3))
                )
            ]
        found = plain_addresses(values)
        if found is not None:
            plain += 1
            assert found == getaddresses(values), values
    assert plain > 5_000  # the fast path is taken, not only stepped aside


def test_plain_addresses_covers_the_common_forms() -> None:
    assert plain_addresses(["Sender 5 <s5@example.org>, b@c.d", "\r\n\tE  F <e.f@g.h>"]) == [
        ("Sender 5", "s5@example.org"),
        ("", "b@c.d"),
        ("E F", "e.f@g.h"),
    ]
    assert plain_addresses(["=?GBK?B?1cXI/Q==?= <z@qq.com>"]) == [
        ("=?GBK?B?1cXI/Q==?=", "z@qq.com")
    ]
    for odd in ('"Q" <a@b>', "John Q. Public <j@x>", "a@b (c)", "<a@b>", "g: a@b;", ""):
        assert plain_addresses([odd]) is None
