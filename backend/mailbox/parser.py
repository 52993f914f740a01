"""Raw RFC 822 bytes to the fields mailbeat keeps: decoded headers, addresses, date,
text and HTML bodies, attachments with safe names.

Real mail is often malformed. The compat32 parser is used because it is tolerant and
fast; every field is decoded on its own, so one bad header costs that header only.
Text going to the database is made valid UTF-8 without NUL (PostgreSQL refuses both).
"""

from __future__ import annotations

import codecs
import email
import email.parser
import mimetypes
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message as EmailMessage
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

MAX_SAFE_NAME = 200
# Messages at least this big are split into parts with regular expressions over the
# whole text (C speed) instead of the line-by-line feed parser, which spends most of its
# time on the lines of large base64 attachments. Anything unusual falls back to it.
FAST_PATH_BYTES = 8 * 1024
MAX_FAST_DEPTH = 20
_HEADER_END = re.compile(r"\r?\n\r?\n")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f/\\:*?\"<>|]+")
# Characters that change how a name displays without showing themselves: bidirectional
# controls ('\u202egnp.exe' displays as 'exe.png') and zero-width ones.
_INVISIBLE = re.compile("[\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def parse_message(raw: bytes, *, fast_path_bytes: int = FAST_PATH_BYTES) -> ParsedMessage:
    """Parse one message. Raises only when the message cannot be read at all; the
    caller then stores it raw with the error."""
    msg = None
    # The feed parser also ends lines at a lone CR; the fast path only knows LF and CRLF.
    if len(raw) >= fast_path_bytes and raw.count(b"\r") == raw.count(b"\r\n"):
        msg = _fast_tree(raw.decode("ascii", "surrogateescape"), depth=0)
    if msg is None:
        msg = email.message_from_bytes(raw)
    parsed = ParsedMessage(
        message_id=_header_text(msg, "message-id", limit=998),
        subject=_header_text(msg, "subject"),
        date=_date(msg.get("date")),
    )
    senders = _addresses(msg, "from")
    parsed.from_addr = senders[0] if senders else None
    parsed.to_addrs = _addresses(msg, "to")
    parsed.cc_addrs = _addresses(msg, "cc")
    _walk(msg, parsed)
    return parsed


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
    msg = email.parser.Parser().parsestr(text[: end.start()] + "\n", headersonly=True)
    if msg.defects or msg.get_payload():
        return None  # a line in the header block that is not a header
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
    msg.set_payload(parts)  # type: ignore[arg-type]
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
    """Valid UTF-8 without NUL: bytes smuggled in as surrogates become U+FFFD."""
    if _SURROGATE.search(text):
        try:  # raw 8-bit bytes the parser carried as surrogates: decode them as UTF-8
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = _SURROGATE.sub("\ufffd", text)
    return text.replace("\x00", "") if "\x00" in text else text


def decode_words(value: Any) -> str:
    """An RFC 2047 header value as text; unknown charsets and bad bytes degrade to U+FFFD."""
    try:
        return clean_text(str(make_header(decode_header(value))))
    except (LookupError, UnicodeError, ValueError, TypeError, AssertionError):
        pass
    try:
        chunks = decode_header(value)
    except Exception:
        return clean_text(str(value))
    return clean_text(
        "".join(
            part if isinstance(part, str) else _bytes_to_text(part, charset)
            for part, charset in chunks
        )
    )


def _bytes_to_text(data: bytes, charset: str | None) -> str:
    """Text in its declared charset; mislabelled UTF-8 (common) is still read as UTF-8."""
    codec = charset if charset and charset != "unknown-8bit" else None
    if codec is not None:
        try:
            codecs.lookup(codec)
        except LookupError:
            codec = None
    for candidate in (codec, "utf-8"):
        if candidate is None:
            continue
        try:
            return data.decode(candidate)
        except UnicodeDecodeError:
            continue
    return data.decode(codec or "latin-1", "replace")


def _header_text(msg: EmailMessage, name: str, *, limit: int | None = None) -> str | None:
    value = msg.get(name)
    if value is None:
        return None
    text = " ".join(decode_words(value).split())
    if not text:
        return None
    return text[:limit] if limit else text


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    values = msg.get_all(name) or []
    try:
        pairs = getaddresses([str(v) for v in values])
    except Exception:
        return [decode_words(v) for v in values]
    result: list[str] = []
    for raw_display, raw_addr in pairs:
        display = " ".join(decode_words(raw_display).split()) if raw_display else ""
        addr = clean_text(raw_addr.strip())
        if not addr and not display:
            continue
        result.append(f"{display} <{addr}>" if display and addr else addr or display)
    return result


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


def _walk(part: EmailMessage, parsed: ParsedMessage) -> None:
    # An attached message (message/rfc822) is one attachment, not more bodies.
    if part.is_multipart() and part.get_content_maintype() != "message":
        for child in part.get_payload():
            if isinstance(child, EmailMessage):
                _walk(child, parsed)
        return
    content_type = part.get_content_type()
    disposition = part.get_content_disposition()
    raw_filename = part.get_param("filename", header="content-disposition") or part.get_param(
        "name", header="content-type"
    )
    filename = None
    if raw_filename:
        filename = decode_words(email.utils.collapse_rfc2231_value(raw_filename)) or None
    is_body = disposition != "attachment" and filename is None
    if is_body and content_type == "text/plain" and parsed.text_body is None:
        parsed.text_body = _part_text(part)
        return
    if is_body and content_type == "text/html" and parsed.html_body is None:
        parsed.html_body = _part_text(part)
        return
    if is_body and content_type.startswith("text/") and disposition is None:
        return  # a second inline text part: it stays in the raw message
    data = _part_bytes(part)
    index = len(parsed.attachments) + 1
    content_id = part.get("content-id")
    parsed.attachments.append(
        ParsedAttachment(
            filename=filename,
            safe_name=safe_filename(filename, index=index, content_type=content_type),
            content_type=content_type[:255],
            content_id=decode_words(content_id).strip()[:998] if content_id else None,
            data=data,
        )
    )


def _part_bytes(part: EmailMessage) -> bytes:
    inner = part.get_payload()
    if isinstance(inner, list):  # message/rfc822 (one message), message/delivery-status
        return b"\n".join(m.as_bytes() for m in inner if isinstance(m, EmailMessage))
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    return str(part.get_payload()).encode("utf-8", "surrogateescape")


def _part_text(part: EmailMessage) -> str:
    return clean_text(_bytes_to_text(_part_bytes(part), part.get_content_charset()))


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
