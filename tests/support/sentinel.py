"""Redis with Sentinel on loopback: a master, a replica (`--replicaof`) and three
`redis-server --sentinel`, each a real process on a free port, with its files in one
directory. Short failure detection (down-after-milliseconds), so a failover takes a few
seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group
from tests.support.wait import wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
MASTER_NAME = "mailbeat-test"
QUORUM = 2
DOWN_AFTER_MILLISECONDS = 1000
# Also how long a sentinel waits before trying again when an election fails: short.
FAILOVER_TIMEOUT_MILLISECONDS = 5000

SENTINEL_CONFIG = f"""\
bind 127.0.0.1
dir {{directory}}
sentinel monitor {MASTER_NAME} 127.0.0.1 {{master_port}} {QUORUM}
sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MILLISECONDS}
sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MILLISECONDS}
sentinel parallel-syncs {MASTER_NAME} 1
"""


class Server:
    def __init__(self, name: str, directory: Path, argv: list[str]) -> None:
        self.name = name
        self.directory = directory
        self.port = int(argv[argv.index("--port") + 1])
        self.log_path = directory / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: the host died, nothing is saved or handed over."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class RedisSentinels:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[Server] = []

    def _start(self, name: str, *args: str) -> Server:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        server = Server(name, directory, [REDIS_SERVER, *args, "--port", str(port)])
        self.servers.append(server)
        wait_for_port(port)
        return server

    def start(self) -> RedisSentinels:
        quiet = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.master = self._start("master", *quiet)
        self.replica = self._start(
            "replica", *quiet, "--replicaof", "127.0.0.1", str(self.master.port)
        )
        self.sentinels = []
        for number in range(1, 4):
            directory = self.root / f"sentinel-{number}"
            directory.mkdir(parents=True, exist_ok=True)
            # A sentinel rewrites its own file (what it learnt), so it gets a copy.
            config = directory / "sentinel.conf"
            config.write_text(
                SENTINEL_CONFIG.format(directory=directory, master_port=self.master.port)
            )
            self.sentinels.append(self._start(f"sentinel-{number}", str(config), "--sentinel"))
        wait_for(self._ready, "the sentinels to know the master, the replica and each other")
        return self

    def _ready(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client()
            replicas: Any = client.sentinel_slaves(MASTER_NAME)
            others: Any = client.sentinel_sentinels(MASTER_NAME)
            synced = [r for r in replicas if r["master-link-status"] == "ok"]
            if len(synced) != 1 or len(others) != len(self.sentinels) - 1:
                return False
        return True

    @property
    def url(self) -> str:
        """REDIS_URL for mailbeat: Celery's form, the database at the end."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    def master_port(self) -> int | None:
        """The master's port as a majority of sentinels has it."""
        ports = []
        for sentinel in self.sentinels:
            try:
                address: Any = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                ports.append(int(address[1]))
        for port in set(ports):
            if ports.count(port) >= QUORUM:
                return port
        return None

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.log()[-3000:]}" for s in self.servers)

    def stop(self) -> None:
        for server in reversed(self.servers):
            stop_group(server.process)


@contextmanager
def running_sentinels(root: Path) -> Iterator[RedisSentinels]:
    ha = RedisSentinels(root)
    try:
        yield ha.start()
    finally:
        ha.stop()
