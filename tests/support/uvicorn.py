"""The API as a real `uvicorn` process, for what a TestClient cannot show: threads held
across requests, memory while a body streams in, the server's own socket handling."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group

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
def running_api(log_dir: Path, **env: str) -> Iterator[RunningApi]:
    """`uvicorn backend.main:app` with the test bed's environment plus `env`; stopped at
    the end of the block."""
    port = free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "uvicorn", "backend.main:app", "--port", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--log-level", "warning"],
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, timeout=60)
        yield RunningApi(f"http://127.0.0.1:{port}", port, process.pid, log_path)
    finally:
        stop_group(process)
