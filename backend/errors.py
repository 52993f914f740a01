"""One error base class; the API turns it into {"error", "detail"} with its status code."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


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


class ValidationError(MailbeatError):
    """The request is well-formed but its values do not fit together (422, answered in the
    same shape as the schema's own validation errors)."""

    status_code = 422

    def __init__(self, message: str, *, loc: tuple[str | int, ...] = ("body",)) -> None:
        super().__init__(message)
        self.loc = loc


class ErrorBody(BaseModel):
    """Every error response: the error's name and what went wrong."""

    error: str
    detail: str


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None


class ValidationErrorBody(ErrorBody):
    """A 422: `detail` sums up every problem; `errors` lists them with their location."""

    errors: list[ValidationProblem]


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer (422 always)."""
    described = {
        400: "the body is not JSON",
        401: "missing or wrong admin token",
        404: "no such object",
        409: "conflicts with the current state",
        502: "the IMAP server failed",
        503: "a service it needs (Redis, storage, the workers) does not answer",
    }
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": described.get(status, "error")}
        for status in statuses
    }
    responses[422] = {"model": ValidationErrorBody, "description": "invalid request"}
    return responses
