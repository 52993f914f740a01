"""/health cannot jam the API: a burst of unauthenticated health checks leaves the
request path free (issue: 20 concurrent /health left every thread waiting on the broker
connection pool, and authenticated polls hung until a restart)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support.api import account_payload, auth_headers
from tests.support.uvicorn import running_api

BURST = 60


def test_a_burst_of_health_checks_leaves_polls_answering(tmp_path: Path) -> None:
    with (
        running_api(tmp_path, SCHEDULER_MODE="celery") as server,
        httpx.Client(base_url=server.url, headers=auth_headers(), timeout=30) as client,
    ):
        account = client.post("/accounts", json=account_payload())
        assert account.status_code == 201, account.text
        account_id = account.json()["id"]

        def health(_: int) -> int:
            with httpx.Client(base_url=server.url, timeout=60) as anonymous:
                return anonymous.get("/health").status_code

        with ThreadPoolExecutor(max_workers=BURST) as pool:
            statuses = list(pool.map(health, range(BURST)))
        # No worker runs here: degraded, but every check answered.
        assert set(statuses) == {200}

        # A generous bound: on the broken code the request never answers at all.
        poll = client.post(f"/accounts/{account_id}/poll", timeout=15)
        assert poll.status_code == 202, poll.text
        workers = client.get("/admin/celery/workers", timeout=15)
        assert workers.status_code == 200, workers.text
        assert workers.json()["total"] == 0
