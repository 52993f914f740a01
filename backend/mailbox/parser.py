"""Raw RFC 822 bytes to the fields mailbeat keeps: decoded headers, addresses, date,
text and HTML bodies, attachments with safe names.

Real mail is often malformed. The compat32 parser is used because it is tolerant and
fast, with a policy that hands raw 8-bit header bytes over as bytes; every field is
decoded on its own, as a mail reader shows it (docs/architecture.md, "Decoding mail":
the fallback order), so one bad header costs that header only, and never an exception.
Text going to the database is made valid UTF-8 without NUL (PostgreSQL refuses both).
"""

from __future__ import annotations

import binascii
import email
import hashlib
import io
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import MissingHeaderBodySeparatorDefect
from email.generator import BytesGenerator
from email.header import Header, decode_header
from email.message import Message as EmailMessage
from email.policy import Compat32
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from backend.config import get_settings
from backend.mailbox import charsets
from backend.mailbox.charsets import Encoding

MAX_SAFE_NAME = 200
# Messages are split into parts with regular expressions over the whole text (C speed)
# instead of the line-by-line feed parser, which spends most of its time on the lines of
# base64 attachments: twice as fast for small messages as well (docs/benchmarks.md).
# Anything unusual falls back to the feed parser.
MAX_FAST_DEPTH = 20
_HEADER_END = re.compile(r"\r?\n\r?\n")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f/\\:*?\"<>|]+")
# Characters that change how a name displays without showing themselves: bidirectional
# controls ('\u202egnp.exe' displays as 'exe.png') and zero-width ones.
_INVISIBLE = re.compile("[\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# An RFC 2047 encoded word; the text may hold raw 8-bit bytes (as surrogates), not "?".
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([qQbB])\?([^?]*)\?=")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# A header field with its continuation lines; its name as the feed parser allows it.
_HEADER_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]+):([^\n]*(?:\n[\t ][^\n]*)*)\n")
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322: printable, no colon
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_ASCII_LABELS = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968"})


class _RawHeaders(Compat32):
    """compat32, except that a header holding 8-bit bytes is handed over as parsed (the
    bytes as surrogates), not as a Header whose str() makes each byte a U+FFFD: the
    decoding below reads those bytes."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


POLICY = _RawHeaders()

_LONE_CR = re.compile(rb"\r(?!\n)")
# `plain_addresses`: RFC 5322 atoms and dot-atoms, and lists of plain addresses.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"
_WSP = r"[ \t\r\n]*"
_NAME = rf"{_ATEXT}+(?:[ \t\r\n]+{_ATEXT}+)*"
_PLAIN = rf"{_WSP}(?:({_NAME}){_WSP}<({_ADDR_SPEC})>|({_ADDR_SPEC})){_WSP}"
_PLAIN_ADDRESS = re.compile(_PLAIN)
_PLAIN_LIST = re.compile(rf"{_PLAIN}(?:,{_PLAIN})*")


@dataclass
class ParsedAttachment:
    filename: str | None  # as the sender gave it, decoded
    safe_name: str
    content_type: str
    content_id: str | None
    data: bytes


@dataclass
class ParsedMessage:
    message_id: str | None = None
    subject: str | None = None
    from_addr: str | None = None
    to_addrs: list[str] = field(default_factory=list)
    cc_addrs: list[str] = field(default_factory=list)
    date: datetime | None = None
    text_body: str | None = None
    html_body: str | None = None
    attachments: list[ParsedAttachment] = field(default_factory=list)
    # The fields whose text is a guess: raw 8-bit header bytes that are not UTF-8 (read
    # in a fallback charset), text not valid in its declared charset, a charset detected,
    # or bytes that could not be read at all (U+FFFD). Names: "subject", "from_addr",
    # "to_addrs", "cc_addrs", "message_id", "text_body", "html_body",
    # "attachments[N].filename" (N: the index in `attachments`).
    decode_fallbacks: list[str] = field(default_factory=list)


def parse_message(
    raw: bytes, *, fast: bool = True, header_fallback: str | None = None
) -> ParsedMessage:
    """Parse one message. Raises only when the message cannot be read at all; the
    caller then stores it raw with the error. `header_fallback`: the charset for raw
    8-bit header bytes when neither UTF-8 nor the first text part's (default:
    HEADER_FALLBACK_CHARSET). `fast=False`: the feed parser only (tests hold the two
    equal)."""
    msg = None
    # The feed parser also ends lines at a lone CR; the fast path only knows LF and CRLF.
    if fast and _LONE_CR.search(raw) is None:
        msg = _fast_tree(raw.decode("ascii", "surrogateescape"), depth=0)
    if msg is None:
        msg = email.message_from_bytes(raw, policy=POLICY)
        if any(isinstance(d, MissingHeaderBodySeparatorDefect) for d in msg.defects):
            mended = _mend_header_block(raw)
            if mended is not None:
                msg = email.message_from_bytes(mended, policy=POLICY)
    decoding = _Decoding(msg, header_fallback)
    parsed = ParsedMessage(
        message_id=_header_text(msg, "message-id", decoding, field="message_id", limit=998),
        subject=_header_text(msg, "subject", decoding, field="subject"),
        date=_date(msg.get("date")),
    )
    senders = _addresses(msg, "from", decoding, field="from_addr")
    parsed.from_addr = senders[0] if senders else None
    parsed.to_addrs = _addresses(msg, "to", decoding, field="to_addrs")
    parsed.cc_addrs = _addresses(msg, "cc", decoding, field="cc_addrs")
    _walk(msg, parsed, decoding, None)
    parsed.decode_fallbacks = decoding.fallbacks
    return parsed


def _mend_header_block(raw: bytes) -> bytes | None:
    """The feed parser ends the header block at the first line that is not a header;
    mail readers end it at the blank line. When every line up to the blank line is a
    header or a continuation, but a field name holds a space or a tab (`Subject :`,
    `X-Name/with\tspace:`), the names are mended (or the field dropped when nothing
    valid is left of its name), so the body starts where the sender put it. None when
    the block has a line that is no header at all (then it is left as it is)."""
    end = _HEADER_END.search(raw.decode("ascii", "surrogateescape"))
    if end is None:
        return None
    kept: list[bytes] = []
    dropping = False
    for line in raw[: end.start()].split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        name = name.rstrip(b" \t")
        dropping = _FIELD_NAME.fullmatch(name) is None
        if not dropping:
            kept.append(name + b":" + value)
    return b"\n".join(kept) + raw[end.start() :]


def _fast_tree(text: str, *, depth: int) -> EmailMessage | None:
    """The same tree the feed parser builds, for well-formed messages; None when the
    message has anything the fast path does not handle exactly like the feed parser."""
    if depth > MAX_FAST_DEPTH:
        return None
    if text.startswith(("\r\n", "\n")):
        return None  # no headers at all: leave the odd case to the feed parser
    end = _HEADER_END.search(text)
    if end is None:
        return None
    msg = _header_block(text[: end.start()] + "\n")
    if msg is None:
        return None
    body = text[end.end() :]
    maintype = msg.get_content_maintype()
    if maintype == "message" or msg.get_content_type() == "multipart/digest":
        return None
    if maintype != "multipart":
        msg.set_payload(body)
        return msg
    boundary = msg.get_boundary()
    if not boundary:
        return None
    parts: list[EmailMessage] = []
    start: int | None = None
    for delimiter_start, delimiter_end, closing in _delimiters(body, "--" + boundary):
        if start is not None:
            chunk = body[start:delimiter_start]
            # The line break before a delimiter belongs to the delimiter.
            chunk = chunk[:-2] if chunk.endswith("\r\n") else chunk.removesuffix("\n")
            part = _fast_tree(chunk, depth=depth + 1)
            if part is None:
                return None
            parts.append(part)
        if closing:
            break
        start = delimiter_end
    else:
        return None  # no closing delimiter
    if not parts:
        return None  # closed before a part began: the feed parser keeps the body as text
    msg.set_payload(parts)  # type: ignore[arg-type]
    return msg


def _header_block(block: str) -> EmailMessage | None:
    """The fields of a header block (each line ended by "\n"), set as the feed parser
    sets them (`Compat32.header_source_parse`), in one regular expression match per
    field instead of its line-by-line reading; None when a line is neither a field nor
    a continuation (a defect, left to the feed parser)."""
    msg = EmailMessage(policy=POLICY)
    position = 0
    while position < len(block):
        found = _HEADER_FIELD.match(block, position)
        if found is None:
            return None
        msg.set_raw(found[1], found[2].lstrip(" \t").rstrip("\r\n"))
        position = found.end()
    return msg


def _delimiters(body: str, marker: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end after its line break, is the closing one) of each boundary line: a
    line that is the marker, optionally "--", then only blanks (as the feed parser says)."""
    position = 0
    while (found := body.find(marker, position)) >= 0:
        line_end = body.find("\n", found)
        line_end = len(body) if line_end < 0 else line_end
        position = line_end + 1
        if found and body[found - 1] != "\n":
            continue
        rest = body[found + len(marker) : line_end].rstrip("\r").rstrip(" \t")
        if rest in ("", "--"):
            yield found, line_end + 1, rest == "--"


def clean_text(text: str) -> str:
    """Valid UTF-8 without NUL: bytes smuggled in as surrogates are read as UTF-8, and
    what is not UTF-8 becomes U+FFFD (text decoded here from bytes holds none)."""
    if not text.isascii() and not _encodes(text):
        try:  # raw 8-bit bytes the parser carried as surrogates: decode them as UTF-8
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = _SURROGATE.sub("\ufffd", text)
    return text.replace("\x00", "") if "\x00" in text else text


def _encodes(text: str) -> bool:
    """Whether `text` holds no surrogate: 5-10 times faster than searching for one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Decoding:
    """One message's decoding: where raw 8-bit header bytes that are not UTF-8 are read
    from (the charset of the message's first text part, then HEADER_FALLBACK_CHARSET,
    then windows-1252, which reads every byte), and the fields that needed a fallback."""

    def __init__(self, msg: EmailMessage | None, header_fallback: str | None) -> None:
        self.msg = msg
        self.header_fallback = header_fallback
        self._charsets: tuple[Encoding, ...] | None = None
        self.fallbacks: list[str] = []
        # The first legacy charset the message's encoded words name: the sender's own,
        # a better guess for a body that names none than detection.
        self.word_charset: Encoding | None = None

    def header_charsets(self) -> tuple[Encoding, ...]:
        if self._charsets is None:
            found = [_first_text_charset(self.msg)] if self.msg is not None else []
            label = self.header_fallback or get_settings().header_fallback_charset
            found += [charsets.lookup(label), charsets.WINDOWS_1252]
            self._charsets = tuple(dict.fromkeys(e for e in found if e is not None))
        return self._charsets

    def note(self, name: str, clean: bool) -> None:
        if not clean and name not in self.fallbacks:
            self.fallbacks.append(name)

    def header(self, value: Any, name: str) -> str:
        text, clean = _decode_header(value, self)
        self.note(name, clean)
        return text


def decode_words(value: Any, *, header_fallback: str | None = None) -> str:
    """A header value as text: RFC 2047 encoded words, raw 8-bit bytes (UTF-8, else the
    fallback charsets), raw ISO-2022-JP. Never raises."""
    return _decode_header(value, _Decoding(None, header_fallback))[0]


def _first_text_charset(msg: EmailMessage) -> Encoding | None:
    """The charset the message's first text part declares, when it says something about
    8-bit bytes (not ASCII, not a Unicode form raw header bytes already failed as)."""
    for part in msg.walk():
        if part.get_content_maintype() != "text":
            continue
        label = part.get_content_charset()
        encoding = charsets.lookup(label)
        if encoding is None or label in _ASCII_LABELS or encoding.name.startswith("utf-"):
            return None
        return encoding
    return None


def _decode_header(value: Any, decoding: _Decoding) -> tuple[str, bool]:
    if isinstance(value, Header):  # from a parser with another policy: its raw bytes
        value = "".join(
            chunk.decode("ascii", "surrogateescape") if isinstance(chunk, bytes) else chunk
            for chunk, _ in decode_header(value)
        )
    text = str(value)
    if text.isascii() and "=?" not in text and "\x1b" not in text:
        return clean_text(text), True
    text = _FOLD.sub("", text)
    out: list[str] = []
    clean = True
    position = 0
    run: list[bytes] = []  # the bytes of adjacent encoded words in one charset, joined
    run_label = ""  # (a character split between two words is whole again)
    after_word = False
    for match in _ENCODED_WORD.finditer(text):
        gap = text[position : match.start()]
        label = match.group(1).split("*", 1)[0].lower()
        # Whitespace between two encoded words is dropped; any other text is kept.
        between_words = after_word and not gap.strip(" \t\r\n")
        if run and not (between_words and label == run_label):
            piece, ok = _word_text(b"".join(run), run_label, decoding)
            out.append(piece)
            clean = clean and ok
            run = []
        if gap and not between_words:
            piece, ok = _raw_text(gap, decoding)
            out.append(piece)
            clean = clean and ok
        run.append(_word_bytes(match.group(2), match.group(3)))
        run_label = label
        after_word = True
        position = match.end()
    if run:
        piece, ok = _word_text(b"".join(run), run_label, decoding)
        out.append(piece)
        clean = clean and ok
    if position < len(text):
        piece, ok = _raw_text(text[position:], decoding)
        out.append(piece)
        clean = clean and ok
    return clean_text("".join(out)), clean


def _word_bytes(kind: str, payload: str) -> bytes:
    data = payload.encode("utf-8", "surrogateescape")  # raw 8-bit bytes stay bytes
    if kind in "qQ":
        return binascii.a2b_qp(data, header=True)
    # Base64 as mail readers take it: stray characters dropped, padding mended.
    data = _NOT_BASE64.sub(b"", data.translate(_URLSAFE))
    if len(data) % 4 == 1:
        data = data[:-1]
    return binascii.a2b_base64(data + b"=" * (-len(data) % 4))


def _word_text(data: bytes, label: str, decoding: _Decoding) -> tuple[str, bool]:
    encoding = charsets.lookup(label)
    if encoding is None:  # unknown-8bit, x-unknown, a label nobody knows
        return _raw_bytes(data, decoding)
    if decoding.word_charset is None and not (
        label in _ASCII_LABELS or encoding.name.startswith("utf-")
    ):
        decoding.word_charset = encoding
    return _declared(data, encoding, label)


def _raw_text(text: str, decoding: _Decoding) -> tuple[str, bool]:
    if text.isascii():
        if "\x1b" in text:  # ISO-2022-JP written into the header as it is
            return charsets.decode_lenient(text.encode("ascii"), charsets.ISO_2022_JP)
        return text, True
    return _raw_bytes(text.encode("utf-8", "surrogateescape"), decoding)


def _raw_bytes(data: bytes, decoding: _Decoding) -> tuple[str, bool]:
    """8-bit bytes no charset is given for: UTF-8 (RFC 6532) when they are, else the
    message's fallback charsets, the last of which reads any byte."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        pass
    text = charsets.mostly_utf8(data)
    if text is not None:
        return text, False
    for encoding in decoding.header_charsets():
        text = charsets.decode(data, encoding)
        if text is not None:
            return text, False
    return charsets.decode_lenient(data, charsets.WINDOWS_1252)[0], False


def _declared(data: bytes, encoding: Encoding, label: str | None = None) -> tuple[str, bool]:
    """Text in the charset it names; mislabelled UTF-8 (common) is still read as UTF-8:
    when the bytes are not valid in that charset, or when it is a single-byte one (which
    reads any byte) and they are valid UTF-8 (text in a single-byte charset almost never
    is). A label of ASCII says nothing of 8-bit bytes: UTF-8 when they are, else what
    WHATWG reads ASCII as (windows-1252)."""
    if (label in _ASCII_LABELS or encoding.single_byte) and not data.isascii():
        try:
            return data.decode("utf-8"), label in _ASCII_LABELS
        except UnicodeDecodeError:
            pass
    text = charsets.decode(data, encoding)
    if text is not None:
        return text, True
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return charsets.decode_lenient(data, encoding)[0], False


def _header_text(
    msg: EmailMessage, name: str, decoding: _Decoding, *, field: str, limit: int | None = None
) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    text = " ".join(decoding.header(value, field).split())
    if not text:
        return None
    return text[:limit] if limit else text


def _addresses(msg: EmailMessage, name: str, decoding: _Decoding, *, field: str) -> list[str]:
    values = msg.get_all(name) or []
    try:
        pairs = plain_addresses(values)
        if pairs is None:
            pairs = getaddresses([str(v) for v in values])
    except Exception:
        return [decoding.header(v, field) for v in values]
    result: list[str] = []
    for raw_display, raw_addr in pairs:
        display = " ".join(decoding.header(raw_display, field).split()) if raw_display else ""
        addr = decoding.header(raw_addr.strip(), field)
        if not addr and not display:
            continue
        result.append(f"{display} <{addr}>" if display and addr else addr or display)
    return result


def plain_addresses(values: list[Any]) -> list[tuple[str, str]] | None:
    """What getaddresses gives for header values that are plain lists of `Name <a@b>` or
    `a@b` (no quotes, comments, groups, routes or dots in a name), found by one regular
    expression; None for anything else, which getaddresses reads (character by
    character, a fifth of the parse of a typical message). Tested to agree with it."""
    pairs: list[tuple[str, str]] = []
    for value in values:
        text = str(value)
        if _PLAIN_LIST.fullmatch(text) is None:
            return None
        for found in _PLAIN_ADDRESS.finditer(text):
            name, angled, bare = found.groups()
            pairs.append((" ".join(name.split()), angled) if angled else ("", bare))
    return pairs


def _date(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:  # "-0000": the sender's zone is unknown; RFC 5322 says UTC
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _walk(
    part: EmailMessage, parsed: ParsedMessage, decoding: _Decoding, inherited: Encoding | None
) -> None:
    # An attached message (message/rfc822) is one attachment, not more bodies.
    if part.is_multipart() and part.get_content_maintype() != "message":
        # A charset on a multipart (multipart/signed often carries it) holds for its parts.
        own = charsets.lookup(part.get_content_charset())
        for child in part.get_payload():
            if isinstance(child, EmailMessage):
                _walk(child, parsed, decoding, own or inherited)
        return
    content_type = part.get_content_type()
    disposition = part.get_content_disposition()
    index = len(parsed.attachments)
    filename = _filename(part, decoding, f"attachments[{index}].filename")
    is_body = disposition != "attachment" and filename is None
    if is_body and content_type == "text/plain" and parsed.text_body is None:
        parsed.text_body = _part_text(part, decoding, inherited, "text_body")
        return
    if is_body and content_type == "text/html" and parsed.html_body is None:
        parsed.html_body = _part_text(part, decoding, inherited, "html_body")
        return
    if is_body and content_type.startswith("text/") and disposition is None:
        return  # a second inline text part: it stays in the raw message
    data = _part_bytes(part)
    content_id = part.get("content-id")
    parsed.attachments.append(
        ParsedAttachment(
            filename=filename,
            safe_name=safe_filename(filename, index=index + 1, content_type=content_type),
            content_type=content_type[:255],
            content_id=decode_words(content_id).strip()[:998] if content_id else None,
            data=data,
        )
    )


def _filename(part: EmailMessage, decoding: _Decoding, field: str) -> str | None:
    """The attachment's name: RFC 2231 (continuations, a charset), RFC 2047 inside the
    quotes (as Outlook writes it), or raw 8-bit bytes."""
    raw = part.get_param("filename", header="content-disposition") or part.get_param(
        "name", header="content-type"
    )
    if not raw:
        return None
    if isinstance(raw, tuple):  # RFC 2231: (charset, language, the bytes as latin-1)
        label, _, value = raw
        try:
            data = value.encode("latin-1", "surrogateescape")
        except UnicodeEncodeError:
            data = value.encode("utf-8", "surrogateescape")
        encoding = charsets.lookup(label)
        text, clean = _declared(data, encoding) if encoding else _raw_bytes(data, decoding)
        decoding.note(field, clean)
        if "=?" not in text:
            return clean_text(text) or None
        raw = text
    return decoding.header(raw, field) or None


def _part_bytes(part: EmailMessage) -> bytes:
    # Not get_payload() first: undecoded, it reads 8-bit text in the part's charset with
    # Python's codec of that name, which raises for a label such as "idna".
    if part.is_multipart():  # message/rfc822 (one message), message/delivery-status
        inner = part.get_payload()
        return b"\n".join(_serialized(m) for m in inner if isinstance(m, EmailMessage))
    encoding = part.get("content-transfer-encoding")
    if encoding is not None:
        # "quoted printable", or a value continued on a line holding only a space (the
        # header block's last line): the decoder only knows the plain token.
        transfer = "-".join(str(encoding).split(";", 1)[0].lower().split())
        if transfer != str(encoding).lower():
            part.replace_header("content-transfer-encoding", transfer)
        # The text as parsed (get_payload() is the thing to avoid, above).
        payload = vars(part).get("_payload")
        if transfer == "base64" and isinstance(payload, str) and payload.isascii():
            # What get_payload(decode=True) gives, read straight from the text: the
            # decoder skips line breaks, and any other character outside the alphabet,
            # as get_payload's does (no copies of a large attachment first: they were
            # half of its decoding's time).
            try:
                return binascii.a2b_base64(payload)
            except binascii.Error:
                pass  # padding short or misplaced: get_payload mends it
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


class _StableGenerator(BytesGenerator):
    """BytesGenerator, but a multipart without a usable boundary (none, or empty) gets one
    derived from its parts rather than a random one: the same message serializes to the
    same bytes, so an attached message keeps its content hash from parse to parse."""

    @classmethod
    def _make_boundary(cls, text: bytes | None = None) -> str:
        # The parts cannot hold it: that would take text holding its own hash.
        return "=" * 15 + hashlib.sha256(text or b"").hexdigest()[:24] + "=="


def _serialized(message: EmailMessage) -> bytes:
    """`message.as_bytes()`, the same at every parse (`_StableGenerator`)."""
    out = io.BytesIO()
    _StableGenerator(out, mangle_from_=False, policy=message.policy).flatten(message)
    return out.getvalue()


def _part_text(
    part: EmailMessage, decoding: _Decoding, inherited: Encoding | None, field: str
) -> str:
    """The declared charset; when none is (or an unknown one): the enclosing part's, an
    HTML meta charset, ISO-2022-JP by its escapes, ASCII or UTF-8 when valid, the
    charset the message's encoded words name, then detection."""
    data = _part_bytes(part)
    label = part.get_content_charset()
    encoding = charsets.lookup(label)
    if encoding is not None:
        text, clean = _declared(data, encoding, label)
        decoding.note(field, clean)
        return clean_text(text)
    if data.isascii() and b"\x1b" not in data:
        return clean_text(data.decode("ascii"))
    encoding = inherited
    if encoding is None and part.get_content_subtype() == "html":
        encoding = charsets.html_meta(data)
    if encoding is None and charsets.has_iso2022jp(data):
        encoding = charsets.ISO_2022_JP
    if encoding is not None:
        text, clean = _declared(data, encoding)
        decoding.note(field, clean)
        return clean_text(text)
    text, clean = charsets.decode_lenient(data, charsets.UTF8)
    if clean:
        return clean_text(text)
    decoding.note(field, False)
    if decoding.word_charset is not None:
        text, clean = charsets.decode_lenient(data, decoding.word_charset)
        if clean:
            return clean_text(text)
    guess = charsets.detect(data)
    if guess is not None:
        return clean_text(charsets.decode_lenient(data, guess)[0])
    return clean_text(_raw_bytes(data, decoding)[0])


def displayable(name: str) -> str:
    """`name` without the characters that hide or reorder what a reader sees: C0 and C1
    controls, bidirectional controls and zero-width characters."""
    return _CONTROLS.sub("", _INVISIBLE.sub("", name))


def safe_filename(name: str | None, *, index: int, content_type: str) -> str:
    """A name that is safe on any file system and in any object key: the last path
    component only, no separators or control characters, no leading dots, bounded."""
    text = unicodedata.normalize("NFC", name or "")
    text = _INVISIBLE.sub("", re.split(r"[/\\]", text)[-1])
    text = _UNSAFE_NAME.sub("_", text).strip().lstrip(".").strip()
    if not text or set(text) <= {".", "_", " "}:
        extension = mimetypes.guess_extension(content_type) or ".bin"
        text = f"attachment-{index}{extension}"
    if len(text) > MAX_SAFE_NAME:
        stem, dot, extension = text.rpartition(".")
        if dot and 0 < len(extension) <= 16:
            text = f"{stem[: MAX_SAFE_NAME - len(extension) - 1]}.{extension}"
        else:
            text = text[:MAX_SAFE_NAME]
    return text
