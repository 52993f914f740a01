from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from backend.main import create_app
from tests.support.api import auth_headers, make_client

OPEN = {"/health", "/metrics"}


def protected_routes() -> list[tuple[str, str]]:
    routes: list[tuple[str, str]] = []
    for template, operations in create_app().openapi()["paths"].items():
        if template in OPEN:
            continue
        path = re.sub(r"\{[a-z_]+\}", "1", template)
        routes.extend((method.upper(), path) for method in sorted(operations))
    return routes


def test_every_route_but_health_and_metrics_is_protected():
    paths = {path for _, path in protected_routes()}
    # The contract's routes are all there (and so need the token).
    for path in (
        "/accounts",
        "/accounts/1",
        "/accounts/1/poll",
        "/accounts/1/test",
        "/accounts/1/messages",
        "/messages/1",
        "/messages/1/raw",
        "/messages/1/attachments/1",
        "/admin/email-worker/sync",
        "/admin/celery/tasks/sync",
        "/admin/schedules",
        "/admin/celery/workers",
        "/admin/celery/tasks",
        "/admin/celery/tasks/1",
        "/admin/celery/tasks/1/retry",
    ):
        assert path in paths


@pytest.mark.parametrize(("method", "path"), protected_routes())
def test_401_without_or_with_a_wrong_token(anonymous: TestClient, method: str, path: str):
    response = anonymous.request(method, path)
    assert response.status_code == 401
    assert response.json() == {
        "error": "Unauthorized",
        "detail": "send the admin token as 'Authorization: Bearer <ADMIN_API_TOKEN>'",
    }
    assert response.headers["www-authenticate"] == "Bearer"
    wrong = anonymous.request(method, path, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["detail"] == "the admin token is wrong"
    basic = anonymous.request(method, path, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401


def test_health_and_metrics_need_no_token(anonymous: TestClient):
    # The test bed has a database, Redis and storage but no worker: degraded, not an error.
    health = anonymous.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["celery_worker"].startswith("error: no worker answered")
    metrics = anonymous.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE " in metrics.text


def test_unknown_path_and_method_answer_in_the_error_shape(api: TestClient):
    response = api.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "NotFound", "detail": "Not Found"}
    response = api.put("/accounts")
    assert response.status_code == 405
    assert response.json()["error"] == "MethodNotAllowed"


def test_unexpected_error_is_a_500_that_leaks_nothing_and_logs_a_request_id(
    caplog: pytest.LogCaptureFixture,
):
    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("postgresql://admin:s3cret@db/internal went wrong")

    with TestClient(app, headers=auth_headers(), raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "InternalError"
    assert "s3cret" not in response.text
    assert "RuntimeError" not in response.text
    request_id = re.search(r"request ([0-9a-f]{32})", body["detail"])
    assert request_id is not None
    assert f"[request {request_id.group(1)}]" in caplog.text
    assert "RuntimeError" in caplog.text


def test_openapi_docs_with_examples(anonymous: TestClient):
    assert anonymous.get("/docs").status_code == 200
    schema = anonymous.get("/openapi.json").json()
    create = schema["components"]["schemas"]["AccountCreate"]
    assert create["examples"][0]["imap_host"] == "imap.example.com"
    assert "AccountUpdate" in schema["components"]["schemas"]
    # Secrets are write-only: no response schema has a field for one.
    for name, component in schema["components"]["schemas"].items():
        if name.endswith("Read") or name.endswith("List"):
            assert not {"password", "oauth2", "credentials_encrypted", "webhook_secret"} & set(
                component.get("properties", {})
            ), name


def test_a_misspelt_query_parameter_is_named_not_ignored(api: TestClient, anonymous: TestClient):
    response = api.get("/accounts", params={"stauts": "error"})
    assert response.status_code == 422
    body = response.json()
    assert body["errors"] == [
        {
            "loc": ["query", "stauts"],
            "msg": "unknown query parameter (this route takes: after, limit, offset, status)",
            "type": "extra_forbidden",
        }
    ]
    # Without the token the answer is still 401: nothing about the route is told.
    assert anonymous.get("/accounts", params={"stauts": "error"}).status_code == 401
    # Monitoring endpoints take whatever a scraper adds.
    assert anonymous.get("/metrics", params={"x": "1"}).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_outside(anonymous: TestClient, page: str):
    """Swagger UI and ReDoc work offline: every script, style and icon is served here."""
    response = anonymous.get(page)
    assert response.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", response.text)
    assets = [url for url in urls if url != "/openapi.json"]
    assert assets, response.text
    for url in assets:
        assert url.startswith("/docs-static/"), url
        asset = anonymous.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 1000, url
    assert "//cdn" not in response.text and "fonts.googleapis" not in response.text


def test_static_files_are_served_without_the_token_even_in_production(
    set_env: Callable[..., None],
):
    """The console's page and the docs' assets hold no data; every API call still needs
    the token."""
    set_env(ENVIRONMENT="production")
    with make_client({}) as anonymous:
        for path in ("/ui/", "/ui/app.js", "/ui/style.css", "/docs-static/swagger-ui.css"):
            assert anonymous.get(path).status_code == 200, path
        assert anonymous.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
        assert anonymous.get("/ui/../accounts").status_code in (401, 404)
        assert anonymous.get("/accounts").status_code == 401
        assert anonymous.get("/openapi.json").status_code == 401
