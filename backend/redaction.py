"""What no log line may carry, whichever library writes it: a URL's userinfo
(`user:password@`, basic auth for a webhook receiver), the values of query parameters
that carry credentials (`?token=...`) and the secrets among the settings.

mailbeat's own messages never hold these; third-party loggers do: httpx logs every
request's full URL at INFO (`HTTP Request: POST http://user:password@host/...`), and
uvicorn's access log writes each request's path with its query string. A filter on those
loggers rewrites the values before any handler formats them.
"""

from __future__ import annotations

import logging
import re

from backend.config import get_settings

REDACTED = "***"
MIN_SECRET_LENGTH = 8
# scheme://userinfo@ : what lies between the scheme and the '@' before the host.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@\"']*@")
# Query parameters whose value is a credential, in any case.
SECRET_PARAMETERS = (
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "key",
    "api_key",
    "apikey",
    "password",
    "secret",
    "client_secret",
    "signature",
    "sig",
)
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(SECRET_PARAMETERS) + r")=)[^&;#\s\"']*", re.IGNORECASE
)
# The loggers that write URLs they were given: the HTTP client's, the server's.
CLIENT_LOGGERS = ("httpx", "httpcore")
SERVER_LOGGERS = ("uvicorn.access", "uvicorn.error")


def known_secrets() -> list[str]:
    """The secrets among the settings, each as it would appear in a line: the admin and
    metrics tokens, the encryption keys, the global webhook secret, S3's secret key,
    Flower's login. Short values (none is, in production) are left: they would redact
    ordinary words."""
    try:
        settings = get_settings()
    except Exception:  # settings that do not load: the error says why elsewhere, not here
        return []
    values = [
        settings.admin_api_token,
        settings.encryption_key,
        settings.metrics_token,
        settings.webhook_secret,
        settings.s3_secret_access_key,
        settings.flower_basic_auth,
    ]
    found = []
    for value in values:
        if value is None:
            continue
        for part in value.get_secret_value().split(","):  # several encryption keys
            if len(part.strip()) >= MIN_SECRET_LENGTH:
                found.append(part.strip())
    return found


def redact(text: str) -> str:
    """`text` with URL userinfo, credential query values and the settings' secrets
    replaced by ***."""
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "@" in text:
        text = _USERINFO.sub(lambda found: found["scheme"] + REDACTED + "@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda found: found["name"] + REDACTED, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record's message and arguments in place. The arguments keep their
    places (uvicorn's access formatter unpacks them); a non-text argument whose text
    needs redacting (httpx logs an httpx.URL) is replaced by its redacted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted_argument(argument) for argument in record.args)
        return True


def _redacted_argument(argument: object) -> object:
    if isinstance(argument, int | float | bool) or argument is None:
        return argument
    text = argument if isinstance(argument, str) else str(argument)
    redacted = redact(text)
    return argument if redacted == text else redacted


_FILTER = RedactingFilter()


def install(names: tuple[str, ...]) -> None:
    """Put the filter on these loggers (once each). Loggers' own filters apply to the
    records logged on them, before they propagate to any handler."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
