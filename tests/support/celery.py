"""Real `celery worker` and `celery beat` processes (and push watchers) for end-to-end
tests, started from this checkout with the test environment and stopped by the fixture
that started them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]
CELERY = shutil.which("celery", path=str(Path(sys.executable).parent)) or "celery"


class CeleryProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CeleryProcess:
        # The environment as it is now: the test bed's settings plus the test's set_env.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: signals reach the pool children
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: the machine died, nothing is cleaned up."""
        if self.running():
            os.killpg(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running():
            return
        assert self.process is not None
        stop_group(self.process, timeout)


class Celery:
    """Starts workers and beats; everything it started is stopped at the end of the test."""

    def __init__(self, log_dir: Path, loglevel: str = "INFO") -> None:
        self.log_dir = log_dir
        self.loglevel = loglevel
        self.started: list[CeleryProcess] = []

    def _start(self, name: str, argv: list[str]) -> CeleryProcess:
        process = CeleryProcess(name, argv, self.log_dir / f"{name}.log").start()
        self.started.append(process)
        return process

    def worker(
        self,
        name: str = "w1",
        concurrency: int = 1,
        loglevel: str | None = "",
        queues: str = "email,workflow,default",
    ) -> CeleryProcess:
        """`loglevel` None: no -l at all (celery's default); "" the test bed's level."""
        level = self.loglevel if loglevel == "" else loglevel
        return self._start(
            name,
            [
                CELERY,
                "-A",
                "backend.celery_app",
                "worker",
                "-Q",
                queues,
                "-n",
                f"{name}@%h",
                f"--concurrency={concurrency}",
                "--without-gossip",
                "--without-mingle",
                *([] if level is None else ["-l", level]),
            ],
        )

    def beat(self, name: str = "beat") -> CeleryProcess:
        return self._start(
            name,
            [
                CELERY,
                "-A",
                "backend.celery_app",
                "beat",
                "-l",
                self.loglevel,
                "-s",
                str(self.log_dir / f"{name}-schedule"),
            ],
        )

    def watcher(self, name: str = "watcher") -> CeleryProcess:
        """`python -m backend.cli watch` (backend/push/watcher.py), a process like the rest."""
        return self._start(name, [sys.executable, "-m", "backend.cli", "watch"])

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in self.started)


@contextmanager
def running_celery(log_dir: Path) -> Iterator[Celery]:
    """For a test module's fixture: `with running_celery(tmp_path) as celery: yield celery`.

    The processes' logs are printed as they stop: pytest shows a test's output only when
    it fails, and then what beat and the workers did is the first thing to read."""
    processes = Celery(log_dir)
    try:
        yield processes
    finally:
        processes.stop_all()
        print(processes.logs())
