"""Webhook signatures: HMAC-SHA256 over "{timestamp}.{body}", as documented in docs/webhooks.md.

The timestamp is signed with the body so a captured request cannot be replayed later than
the receiver's tolerance (the replay window).
"""

from __future__ import annotations

import hashlib
import hmac
import time

EVENT_ID_HEADER = "X-Mailbeat-Event-Id"
EVENT_TYPE_HEADER = "X-Mailbeat-Event-Type"
TIMESTAMP_HEADER = "X-Mailbeat-Timestamp"
SIGNATURE_HEADER = "X-Mailbeat-Signature"
ATTEMPT_HEADER = "X-Mailbeat-Delivery-Attempt"
SIGNATURE_VERSION = "v1"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: "v1=<hex digest>"."""
    digest = hmac.new(
        secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance_seconds: int = 300,
    *,
    now: float | None = None,
) -> bool:
    """What a receiver does: the timestamp is recent and one of the signatures (the header
    may carry several, comma-separated, while a secret is rotated) matches."""
    try:
        signed_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - signed_at) > tolerance_seconds:
        return False
    expected = sign(secret, signed_at, body)
    return any(
        hmac.compare_digest(candidate.strip(), expected) for candidate in signature.split(",")
    )
