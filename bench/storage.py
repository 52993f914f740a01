"""Put/get latency against a moto S3 server and local files, and the cost of a write
while S3 is down: `python -m bench.storage [COUNT] [SIZE_BYTES]`."""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3


def _timed(count: int, action: Callable[[int], object]) -> str:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        action(i)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p95 = samples[int(len(samples) * 0.95) - 1]
    return f"p50 {statistics.median(samples):.2f} ms, p95 {p95:.2f} ms, max {samples[-1]:.2f} ms"


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 50_000
    server = MotoS3()
    server.start()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    server.create_bucket(bucket)
    os.environ.update(
        S3_ENDPOINT_URL=server.endpoint_url,
        S3_BUCKET=bucket,
        S3_REGION=REGION,
        S3_ACCESS_KEY_ID=ACCESS_KEY,
        S3_SECRET_ACCESS_KEY=SECRET_KEY,
        S3_ADDRESSING_STYLE="path",
        LOCAL_STORAGE_DIR=tempfile.mkdtemp(prefix="bench-storage-"),
    )
    from backend.config import get_settings
    from backend.storage import service

    data = os.urandom(size)
    try:
        print(f"{count} objects of {size} bytes")
        print("s3 put    ", _timed(count, lambda i: service.put_object(f"s3/{i}", data, "x/y")))
        print("s3 get    ", _timed(count, lambda i: service.get_object("s3", f"s3/{i}")))
        local = service.local_storage()
        print("local put ", _timed(count, lambda i: local.put(f"l/{i}", data, "x/y")))
        print("local get ", _timed(count, lambda i: service.get_object("local", f"l/{i}")))
        server.stop()
        start = time.perf_counter()
        assert service.put_object("down/first", data, "x/y") == "local"
        print(f"first put with S3 down (retries, then local): {time.perf_counter() - start:.2f} s")
        print(
            "later puts with S3 down",
            _timed(count, lambda i: service.put_object(f"down/{i}", data, "x/y")),
        )
        start = time.perf_counter()
        print("health with S3 down:", service.health()[0], f"{time.perf_counter() - start:.2f} s")
        # An endpoint that accepts connections and never answers: health stays bounded.
        with socket.socket() as hung:
            hung.bind(("127.0.0.1", 0))
            hung.listen(16)
            os.environ["S3_ENDPOINT_URL"] = f"http://127.0.0.1:{hung.getsockname()[1]}"
            get_settings.cache_clear()
            service.reset_cache()
            start = time.perf_counter()
            ok = service.health()[0]
            print("health with S3 hung:", ok, f"{time.perf_counter() - start:.2f} s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
