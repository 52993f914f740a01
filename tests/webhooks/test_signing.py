from __future__ import annotations

import hashlib
import hmac

from backend.webhooks import signing

BODY = b'{"id":"evt_1"}'


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"s3cret", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signing.sign("s3cret", 1700000000, BODY) == f"v1={expected}"


def test_verify_checks_secret_body_and_replay_window() -> None:
    signature = signing.sign("s3cret", 1700000000, BODY)

    def ok(secret: str, timestamp: str, body: bytes) -> bool:
        return signing.verify(
            secret, timestamp, body, signature, tolerance_seconds=300, now=1700000100.0
        )

    assert ok("s3cret", "1700000000", BODY)
    assert not ok("other", "1700000000", BODY)
    assert not ok("s3cret", "1700000000", BODY + b" ")
    assert not ok("s3cret", "1700000001", BODY)
    assert not ok("s3cret", "soon", BODY)
    # Outside the window: a captured request replayed later is refused.
    assert not signing.verify(
        "s3cret", "1700000000", BODY, signature, tolerance_seconds=300, now=1700000301.0
    )


def test_verify_accepts_any_of_several_signatures() -> None:
    both = f"v1=deadbeef, {signing.sign('s3cret', 1700000000, BODY)}"
    assert signing.verify("s3cret", "1700000000", BODY, both, tolerance_seconds=5, now=1700000000)
