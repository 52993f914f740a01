"""The console in a real browser: Debian's chromium driven by Playwright, against the app
served by a real uvicorn process (local mode: polls run inside it) on the test bed.

Screenshots of the key states are kept under test-artifacts/console/ (gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class Server:
    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@pytest.fixture
def serve(set_env: Callable[..., None]) -> Iterator[Callable[..., Server]]:
    """Start the API (uvicorn, local mode) with the test bed's settings plus `env`."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: object) -> Server:
        set_env(SCHEDULER_MODE="local", MIN_POLL_INTERVAL_SECONDS=1, **env)
        port = free_port()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        log_path = ARTIFACTS / f"uvicorn-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "backend.main:app", "--port", str(port)],
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        wait_for_port(port, timeout=30)
        server = Server(port, log_path)
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        return server

    yield start
    for process in started:
        stop_group(process)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page = context.new_page()
    # Generous for a loaded 2-core machine: an expectation's default 5 s failed the
    # console's tests under a second suite, with the page only late, not wrong.
    page.set_default_timeout(30_000)
    expect.set_options(timeout=30_000)
    yield page
    context.close()


def screenshot(page: Page, name: str) -> Path:
    """Keep what the page looks like now as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
