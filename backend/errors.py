"""One error base class; the API turns it into {"error", "detail"} with its status code."""

from __future__ import annotations


class MailbeatError(Exception):
    status_code: int = 400

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    @property
    def name(self) -> str:
        return type(self).__name__


class NotFound(MailbeatError):
    status_code = 404


class Conflict(MailbeatError):
    status_code = 409


class ServiceUnavailable(MailbeatError):
    status_code = 503
