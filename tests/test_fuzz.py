"""Fuzz the API from its own OpenAPI schema: no input may cause a 500, and every answer
must match what the schema promises (status codes, content types, bodies)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from backend.main import create_app
from tests.support.api import auth_headers

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app())


@pytest.fixture(autouse=True)
def _quick(set_env: Callable[..., None]) -> None:
    # Keep each example quick: short Celery inspects, and account tests that give up
    # fast on whatever host the fuzzer made up.
    set_env(CELERY_INSPECT_TIMEOUT_SECONDS="0.1", IMAP_CONNECT_TIMEOUT="1")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_never_fails_on_any_input(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    # Cross-field rules (one of password / oauth2, the initial-sync pairs) and rules about
    # the stored account are not in the schema: a 422 for schema-valid data is expected.
    case.call_and_validate(headers=auth_headers(), excluded_checks=[positive_data_acceptance])
