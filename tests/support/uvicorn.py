"""The API as a real `uvicorn` process, for what a TestClient cannot show: threads held
across requests, memory while a body streams in, the server's own socket handling."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from backend import serving
from tests.support.processes import stop_group
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunningApi:
    url: str
    port: int
    pid: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_api(
    log_dir: Path, *, log_level: str = "warning", options: tuple[str, ...] = (), **env: str
) -> Iterator[RunningApi]:
    """`uvicorn backend.main:app` with the test bed's environment plus `env` (and uvicorn's
    `options`); stopped at the end of the block."""
    # The socket is bound and listening here, and uvicorn serves it (--fd): a port merely
    # found free could be taken by another process before uvicorn binds it (other test
    # sessions start Flower, moto, uvicorn on free ports), and then this process's
    # requests would be answered by whatever took it.
    listener = socket.create_server(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    log_path = log_dir / f"uvicorn-{port}.log"
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "uvicorn", "backend.main:app", "--fd", str(listener.fileno())]
    argv += ["--http", serving.PROTOCOL]
    with listener, log_path.open("ab") as log:
        process = subprocess.Popen(
            [*argv, "--log-level", log_level, *options],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=[listener.fileno()],
        )
    try:
        # The socket takes connections at once; the app is up once it answers one.
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url + "/health"), f"uvicorn to answer on {url}", 60)
        yield RunningApi(url, port, process.pid, log_path)
    finally:
        stop_group(process)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return False
    return True
