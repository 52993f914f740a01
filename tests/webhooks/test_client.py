"""Pure logic of an attempt's answer: retry or not, and when."""

from __future__ import annotations

from http import HTTPStatus

import httpx
import pytest

from backend.config import Settings
from backend.webhooks.client import classify, parse_retry_after, retry_delay


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (500, True),
        (502, True),
        (503, True),
        (408, True),
        (429, True),
        (400, False),
        (401, False),
        (404, False),
        (410, False),
        (422, False),
        (301, False),
    ],
)
def test_which_answers_are_retried(status: int, retryable: bool) -> None:
    result = classify(httpx.Response(status, text="internal banner"))
    assert not result.ok
    assert result.retryable is retryable
    # The status and its phrase; never the receiver's body (dead letters show it).
    assert result.error == f"HTTP {status} {HTTPStatus(status).phrase}"


def test_2xx_is_delivered() -> None:
    assert classify(httpx.Response(204)).ok


def test_retry_after_seconds_or_http_date() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    result = classify(httpx.Response(429, headers={"Retry-After": "7"}))
    assert result.retry_after == 7.0


def test_backoff_grows_with_jitter_up_to_the_maximum() -> None:
    settings = Settings(webhook_backoff_base_seconds=10, webhook_backoff_max_seconds=100)
    for attempts, low, high in [(1, 5, 10), (2, 10, 20), (3, 20, 40), (4, 40, 80), (9, 50, 100)]:
        delays = {retry_delay(attempts, None, settings) for _ in range(50)}
        assert all(low <= d <= high for d in delays)
        assert len(delays) > 1  # jittered
    # Never sooner than the receiver asked, up to the maximum.
    assert retry_delay(1, 70.0, settings) == 70.0
    assert retry_delay(1, 500.0, settings) == 100.0
