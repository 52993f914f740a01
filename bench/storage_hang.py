"""An S3 that accepts connections and never answers (moto frozen with SIGSTOP), seen by
several writer processes: for each, how long after the hang its first local write
landed and how long it sat blocked in a put to S3. Run with the shared breaker (Redis
up) and, as the baseline in the same run, with Redis unreachable (each process keeps its
own breaker): `python -m bench.storage_hang [PROCESSES]`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.stack import load_average
from tests.support.net import free_port
from tests.support.redis_db import RedisDb
from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, MotoS3

ROOT = Path(__file__).resolve().parents[1]
# Seconds between one process's writes; the processes' writes are spread evenly over it,
# so some of them start writing only after another one found S3 hanging.
WRITE_EVERY = 16.0
# One writer: puts an object every WRITE_EVERY seconds, prints each put as a JSON line.
WRITER = """
import json, sys, time
from backend.storage import service
start_at, stop_at = float(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
n = 0
while time.time() < stop_at:
    started = time.time()
    backend = service.put_object(f"bench/{sys.argv[3]}/{n}", b"x" * 50_000, "x/y")
    print(json.dumps({"started": started, "ended": time.time(), "backend": backend}), flush=True)
    n += 1
    time.sleep(max(0.0, started + float(sys.argv[4]) - time.time()))
"""


def run(server: MotoS3, bucket: str, redis_url: str, processes: int) -> list[tuple[float, float]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ENVIRONMENT": "test",
        "MAILBEAT_ENV_FILE": "/nonexistent",
        "REDIS_URL": redis_url,
        "S3_ENDPOINT_URL": server.endpoint_url,
        "S3_BUCKET": bucket,
        "S3_REGION": REGION,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_ADDRESSING_STYLE": "path",
        "LOCAL_STORAGE_DIR": tempfile.mkdtemp(prefix="bench-hang-"),
    }
    # Every process writes once to S3 first, then S3 hangs just before the first one's
    # second write.
    started = time.time() + 5.0  # interpreters loaded
    frozen_at = started + WRITE_EVERY - 0.1
    stop_at = frozen_at + WRITE_EVERY + 2.0
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(started + i * WRITE_EVERY / processes),
                str(stop_at),
                str(i),
                str(WRITE_EVERY),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        for i in range(processes)
    ]
    time.sleep(frozen_at - time.time())
    server.freeze()
    try:
        outputs = [writer.communicate(timeout=WRITE_EVERY + 120)[0] for writer in writers]
    finally:
        server.thaw()
    results = []
    for output in outputs:
        puts = [json.loads(line) for line in output.splitlines()]
        if os.environ.get("BENCH_DEBUG"):
            print(
                [
                    (
                        round(p["started"] - frozen_at, 1),
                        round(p["ended"] - frozen_at, 1),
                        p["backend"],
                    )
                    for p in puts
                ]
            )
        local = [p for p in puts if p["backend"] == "local" and p["ended"] > frozen_at]
        blocked = sum(
            p["ended"] - max(p["started"], frozen_at)
            for p in puts
            if p["ended"] > frozen_at and p["ended"] - p["started"] > 1.0
        )
        results.append((local[0]["ended"] - frozen_at if local else float("inf"), blocked))
    return results


def main() -> None:
    processes = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    server = MotoS3()
    server.start()
    redis_db = RedisDb().claim()
    try:
        print(
            f"{processes} writer processes, one 50 kB put every {WRITE_EVERY:.0f} s each, "
            f"spread evenly; {load_average()}"
        )
        for label, url in (
            ("shared breaker (Redis up)", redis_db.url),
            ("per-process breaker (Redis unreachable)", f"redis://127.0.0.1:{free_port()}/0"),
        ):
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            server.create_bucket(bucket)
            results = run(server, bucket, url, processes)
            firsts = ", ".join(f"{first:.1f}" for first, _ in results)
            blocked = ", ".join(f"{b:.1f}" for _, b in results)
            print(f"{label}: first local write after the hang, s: {firsts}")
            print(
                f"{label}: seconds blocked in S3 puts, per process: {blocked}; "
                f"total {sum(b for _, b in results):.1f}"
            )
    finally:
        redis_db.release()
        server.stop()


if __name__ == "__main__":
    main()
