"""The one HTTP client for webhooks, and what one attempt's answer means for retrying."""

from __future__ import annotations

import queue
import random
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from functools import lru_cache
from http import HTTPStatus
from urllib.parse import urlsplit

import httpx

from backend import netpolicy
from backend.config import Settings, get_settings

USER_AGENT = "mailbeat-webhooks/1"


@lru_cache
def http_client() -> httpx.Client:
    """One client per process, shared by the sending threads: its pool keeps the
    connections to each receiver alive between requests and batches. The threads bound
    the requests in flight (WEBHOOK_CONCURRENCY per receiver), so the pool does not."""
    settings = get_settings()
    return netpolicy.http_client(
        timeout=settings.webhook_timeout_seconds,
        connect_timeout=settings.webhook_connect_timeout_seconds,
        headers={"User-Agent": USER_AGENT},
        max_connections=None,
        # A few receivers' worth of idle connections.
        max_keepalive=4 * settings.webhook_concurrency,
    )


def reset_cache() -> None:
    if http_client.cache_info().currsize:
        http_client().close()
    http_client.cache_clear()


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    retryable: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds, from the receiver's Retry-After


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]


def origin(url: str) -> tuple[str, str, int | None]:
    """The receiver a URL names (scheme, host, port): what WEBHOOK_CONCURRENCY bounds."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def post_concurrently(
    requests: Sequence[Request], per_origin: int, *, report_every: float
) -> Iterator[list[tuple[int, AttemptResult]]]:
    """Post each request once, at most `per_origin` at a time to one origin, from threads
    sharing the one client. Yields the answers as (index in `requests`, result) in groups:
    what came back within `report_every` seconds of the group's first answer, so the
    caller records them in bulk without waiting for a slow receiver to record a fast
    one's answers. A caller that stops early stops the sending after the requests in
    flight."""
    queues: dict[tuple[str, str, int | None], deque[int]] = defaultdict(deque)
    for index, request in enumerate(requests):
        queues[origin(request.url)].append(index)
    answers: queue.SimpleQueue[tuple[int, AttemptResult]] = queue.SimpleQueue()
    client = http_client()

    def lane(indexes: deque[int]) -> None:
        while True:
            try:
                index = indexes.popleft()  # atomic: the lanes of an origin share its queue
            except IndexError:
                return
            request = requests[index]
            try:
                result = _send(client, request.url, request.body, request.headers)
            except Exception as exc:  # an answer is owed for every request, or the caller waits
                result = AttemptResult(ok=False, retryable=True, error=f"request failed: {exc!r}")
            answers.put((index, result))

    lanes = [indexes for indexes in queues.values() for _ in range(min(per_origin, len(indexes)))]
    with ThreadPoolExecutor(max_workers=max(1, len(lanes)), thread_name_prefix="webhook") as pool:
        try:
            for indexes in lanes:
                pool.submit(lane, indexes)
            remaining = len(requests)
            while remaining:
                group = [answers.get()]
                deadline = time.monotonic() + report_every
                while len(group) < remaining and (wait := deadline - time.monotonic()) > 0:
                    try:
                        group.append(answers.get(timeout=wait))
                    except queue.Empty:
                        break
                remaining -= len(group)
                yield group
        finally:
            for indexes in queues.values():
                indexes.clear()


def post(url: str, body: bytes, headers: dict[str, str]) -> AttemptResult:
    return _send(http_client(), url, body, headers)


def _send(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> AttemptResult:
    try:
        response = client.post(url, content=body, headers=headers)
    except netpolicy.OutboundRefused as exc:  # the operator must allow it first
        return AttemptResult(ok=False, retryable=False, error=exc.message)
    except httpx.TimeoutException as exc:
        return AttemptResult(ok=False, retryable=True, error=f"timed out: {exc!r}")
    except httpx.TransportError as exc:
        # Connection refused or reset, DNS, TLS: the receiver may come back.
        return AttemptResult(ok=False, retryable=True, error=f"connection failed: {exc!r}")
    except httpx.HTTPError as exc:  # an unusable URL: retrying cannot help
        return AttemptResult(ok=False, retryable=False, error=f"request failed: {exc!r}")
    return classify(response)


def classify(response: httpx.Response) -> AttemptResult:
    code = response.status_code
    if 200 <= code < 300:
        return AttemptResult(ok=True, retryable=False, status_code=code)
    # 408 and 429 ask to come back later; other 4xx say the request itself is refused,
    # and 3xx is not followed (see http_client), so neither would change on a retry.
    retryable = code >= 500 or code in (408, 429)
    # The status and its standard phrase only: the receiver's body is not ours to show
    # (the dead letters would echo whatever an internal service answered).
    return AttemptResult(
        ok=False,
        retryable=retryable,
        status_code=code,
        error=f"HTTP {code} {_phrase(code)}".rstrip(),
        retry_after=parse_retry_after(response.headers.get("Retry-After")) if retryable else None,
    )


def _phrase(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After is either seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def retry_delay(attempts: int, retry_after: float | None, settings: Settings) -> float:
    """Seconds before the next attempt after `attempts` failed ones: exponential with
    jitter (so receivers coming back are not hit by every retry at once), and never
    sooner than the receiver asked, up to the maximum (a receiver cannot park its
    events for days)."""
    ceiling = min(
        settings.webhook_backoff_max_seconds,
        settings.webhook_backoff_base_seconds * 2.0 ** max(0, attempts - 1),
    )
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - not a secret
    return max(delay, min(retry_after or 0.0, settings.webhook_backoff_max_seconds))
