"""The JSON events mailbeat sends (docs/webhooks.md describes them for receivers)."""

from __future__ import annotations

import json
from datetime import datetime
from email.parser import BytesHeaderParser
from typing import Any

from backend.config import get_settings
from backend.mailbox.parser import clean_text, decode_words
from backend.models import Account, Message, WebhookDelivery
from backend.storage import service as storage
from backend.storage.base import StorageError

# Why something could not be decoded or built, as an event or a dead letter carries it.
REASON_MAX = 500


def envelope(delivery: WebhookDelivery, data: dict[str, Any]) -> bytes:
    event = {
        "id": delivery.event_id,
        "type": delivery.event_type,
        "created_at": _iso(delivery.created_at),
        "data": data,
    }
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


def account_data(account: Account) -> dict[str, Any]:
    """The account as the state change left it (kept with the delivery: it changes later)."""
    return {
        "account": {
            "id": account.id,
            "email": account.email,
            "status": account.status,
            "enabled": account.enabled,
            "last_error": account.last_error,
            "last_error_kind": account.last_error_kind,
            "consecutive_failures": account.consecutive_failures,
            "disabled_reason": account.disabled_reason,
            "last_polled_at": _iso(account.last_polled_at),
            "last_success_at": _iso(account.last_success_at),
        }
    }


def change_data(account: Account, message: dict[str, Any], **details: Any) -> dict[str, Any]:
    """A change to a message received before (message.updated, .deleted, .moved): the
    message's identity as the change left it, and what changed."""
    return {"account": {"id": account.id, "email": account.email}, "message": message, **details}


def message_data(message: Message, account: Account) -> dict[str, Any]:
    settings = get_settings()
    base = settings.public_base_url.rstrip("/")
    content = _content(message, settings.webhook_body_max_bytes)
    return {
        "account": {"id": account.id, "email": account.email},
        "message": {
            "id": message.id,
            "folder": message.folder,
            "uidvalidity": message.uidvalidity,
            "uid": message.uid,
            "message_id": message.message_id,
            "subject": message.subject,
            "from": message.from_addr,
            "to": message.to_addrs,
            "cc": message.cc_addrs,
            "date": _iso(message.date),
            "internal_date": _iso(message.internal_date),
            "flags": message.flags,
            "email_id": message.email_id,
            "thread_id": message.thread_id,
            "labels": message.labels,
            "size": message.size,
            "content_hash": message.content_hash,
            "ingested_at": _iso(message.ingested_at),
            "parse_error": message.parse_error,
            "decode_fallbacks": message.decode_fallbacks or [],
            "skipped_reason": message.skipped_reason,
            **content,
            "raw_url": f"{base}/messages/{message.id}/raw" if message.storage_key else None,
            "attachments": [
                {
                    "id": attachment.id,
                    "filename": attachment.filename,
                    "safe_name": attachment.safe_name,
                    "content_type": attachment.content_type,
                    "content_id": attachment.content_id,
                    "size": attachment.size,
                    "content_hash": attachment.content_hash,
                    "url": f"{base}/messages/{message.id}/attachments/{attachment.id}",
                }
                for attachment in message.attachments
            ],
        },
    }


def _content(message: Message, max_bytes: int) -> dict[str, Any]:
    """Bodies as ingestion decoded them; headers decoded from the stored raw bytes, each
    on its own: one that cannot be decoded goes as it was sent, named in `decode_errors`."""
    content: dict[str, Any] = {"headers": [], "raw_error": None, "decode_errors": []}
    for key, text in (("text", message.text_body), ("html", message.html_body)):
        content[key], content[f"{key}_truncated"] = _cut(text, max_bytes)
    if not (message.storage_backend and message.storage_key):
        return content
    try:
        raw = storage.get_object(message.storage_backend, message.storage_key)
    except StorageError as exc:
        # The event still goes out: the receiver learns the message exists and why the
        # headers are missing, and can fetch raw_url later.
        content["raw_error"] = f"the stored message could not be read: {exc}"
        return content
    # Headers only: the body is not parsed again, nor even handed to the parser.
    headers = BytesHeaderParser().parsebytes(_header_block(raw))
    for name, value in headers.items():
        try:
            text = decode_words(value)
        except Exception as exc:
            # The receiver still gets the header, undecoded, and learns why.
            text = clean_text(str(value))
            content["decode_errors"].append({"header": name, "error": reason(exc)})
        content["headers"].append({"name": name, "value": " ".join(text.split())})
    return content


def reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:REASON_MAX]


def _header_block(raw: bytes) -> bytes:
    """The raw message up to its first empty line (the end of its header)."""
    ends = [end for end in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if end >= 0]
    return raw[: min(ends) + 2] if ends else raw


def _cut(text: str | None, max_bytes: int) -> tuple[str | None, bool]:
    if text is None:
        return None, False
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    # Dropping the partial character at the cut keeps the JSON valid UTF-8.
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), True


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
