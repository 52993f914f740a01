"""What no log line may carry, whichever library writes it: a URL's userinfo
(`user:password@`, basic auth for a webhook receiver) and the values of query
parameters that carry credentials (`?token=...`).

mailbeat's own messages never hold these; third-party loggers do: httpx logs every
request's full URL at INFO (`HTTP Request: POST http://user:password@host/...`), and
uvicorn's access log writes each request's path with its query string. A filter on those
loggers rewrites the values before any handler formats them.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"
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


def redact(text: str) -> str:
    """`text` with URL userinfo and credential query values replaced by ***."""
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
