"""moto's S3 in server mode, as its own process on a free loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_group

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class MotoS3:
    def __init__(self) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if not self.port:
            self.port = free_port()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port(self.port, timeout=60)

    def stop(self) -> None:
        """Stop the server; `start()` again brings it back on the same port (its data is gone)."""
        if self._process is None:
            return
        stop_group(self._process)
        self._process = None

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections on the port, nothing answers."""
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGCONT)

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


class Outage:
    """Stops the moto server; `end()` (or the test's end) brings it back with the bucket,
    empty: moto keeps nothing across a restart."""

    def __init__(self, server: MotoS3, bucket: str) -> None:
        self.server = server
        self.bucket = bucket
        self.down = False

    def begin(self) -> None:
        self.server.stop()
        self.down = True

    def end(self) -> None:
        if self.down:
            self.server.start()
            self.server.create_bucket(self.bucket)
            self.down = False
