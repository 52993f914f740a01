from __future__ import annotations

import hashlib
import hmac
import time

from backend.webhooks import signing
from tests.support.receiver import doc_verify

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


def test_the_docs_verify_and_signing_verify_agree() -> None:
    """docs/webhooks.md's code, as a receiver would copy it, decides as signing.verify."""
    now = int(time.time())
    good = signing.sign("s3cret", now, BODY)
    cases: list[tuple[str, str, bytes, str, bool]] = [
        ("s3cret", str(now), BODY, good, True),
        ("other", str(now), BODY, good, False),
        ("s3cret", str(now), BODY + b" ", good, False),
        ("s3cret", str(now + 1), BODY, good, False),
        ("s3cret", f"0{now}", BODY, good, True),  # the same second, written differently
        ("s3cret", "soon", BODY, good, False),
        ("s3cret", f"{now}.0", BODY, good, False),  # whole seconds only
        ("s3cret", "", BODY, good, False),
        ("s3cret", str(now), BODY, f"v1=deadbeef, {good}", True),
        ("s3cret", str(now), BODY, good.upper(), False),
        ("s3cret", str(now), BODY, "", False),
        ("s3cret", str(now - 400), BODY, signing.sign("s3cret", now - 400, BODY), False),
        ("s3cret", str(now + 400), BODY, signing.sign("s3cret", now + 400, BODY), False),
        ("s3cret", str(now - 200), BODY, signing.sign("s3cret", now - 200, BODY), True),
    ]
    for secret, timestamp, body, signature, expected in cases:
        case = (secret, timestamp, body, signature)
        assert doc_verify()(*case) is expected, case
        assert signing.verify(*case) is expected, case
    # The tolerance, by position as the docs' function takes it.
    late = signing.sign("s3cret", now - 200, BODY)
    assert doc_verify()("s3cret", str(now - 200), BODY, late, 100) is False
    assert signing.verify("s3cret", str(now - 200), BODY, late, 100) is False
