"""The JSON events mailbeat sends (docs/webhooks.md describes them for receivers)."""

from __future__ import annotations

import json
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from backend.config import get_settings
from backend.models import Account, Message, WebhookDelivery
from backend.storage import service as storage
from backend.storage.base import StorageError


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
            "size": message.size,
            "content_hash": message.content_hash,
            "ingested_at": _iso(message.ingested_at),
            "parse_error": message.parse_error,
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
    """Headers and bodies, parsed again from the stored raw bytes."""
    content: dict[str, Any] = {
        "headers": [],
        "text": None,
        "text_truncated": False,
        "html": None,
        "html_truncated": False,
        "body_error": None,
    }
    if not (message.storage_backend and message.storage_key):
        return content
    try:
        raw = storage.get_object(message.storage_backend, message.storage_key)
    except StorageError as exc:
        # The event still goes out: the receiver learns the message exists and why the
        # bodies are missing, and can fetch raw_url later.
        content["body_error"] = f"the stored message could not be read: {exc}"
        return content
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    content["headers"] = [
        {"name": name, "value": _header_value(name, value)} for name, value in parsed.raw_items()
    ]
    for subtype in ("plain", "html"):
        key = "text" if subtype == "plain" else "html"
        text = _body(parsed, subtype)
        if text is not None:
            content[key], content[f"{key}_truncated"] = _cut(text, max_bytes)
    return content


def _header_value(name: str, value: str) -> str:
    try:
        return str(policy.default.header_fetch_parse(name, value))
    except Exception:  # malformed header: the raw text is better than nothing
        return value


def _body(parsed: EmailMessage, subtype: str) -> str | None:
    try:
        part = parsed.get_body(preferencelist=(subtype,))
    except Exception:
        return None
    if part is None:
        return None
    try:
        text = part.get_content()
    except Exception:  # unknown charset or broken transfer encoding
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        text = payload.decode("utf-8", errors="replace")
    return text if isinstance(text, str) else None


def _cut(text: str, max_bytes: int) -> tuple[str, bool]:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text, False
    # Dropping the partial character at the cut keeps the JSON valid UTF-8.
    return encoded[:max_bytes].decode("utf-8", errors="ignore"), True


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
