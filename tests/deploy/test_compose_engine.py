"""docker-compose.yml on a real Docker engine: the project's own file, brought up by
Debian's docker-compose 1.29 on dockerd, with mail from a Dovecot on the host.

Stand-ins: no registry is reachable, so python, redis and postgres are images built here
from Debian packages (tests/deploy/engine.py, standins/). MinIO is left out, through the
route README documents ("Without MinIO": `S3_BUCKET=` in .env, the services named): a
moto server would keep objects in memory only, so `down` then `up` could not show that
stored messages survive, which the app-data volume does. S3 itself is tested against
moto elsewhere (tests/storage, test_stack_processes.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from backend.envfile import EXAMPLE, render
from tests.deploy.engine import STANDIN_DOCKERFILES, Engine, Project, docker
from tests.deploy.files import compose, dockerfile
from tests.deploy.stack import Api, account_body, email, watched, worker_names
from tests.support.dovecot import Dovecot
from tests.support.net import free_port
from tests.support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2700)]

# The README's route without MinIO: these are named, redis, postgres and migrate follow.
SERVICES = ("api", "celery-beat", "celery-worker", "celery-processor", "flower")
INTERVAL_SECONDS = 10
WAIT = 180.0
T = TypeVar("T")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(tmp_path)
    engine.start()
    try:
        engine.ensure_standins()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def bridge_dovecot(tmp_path: Path, engine: Engine) -> Iterator[Dovecot]:
    """A Dovecot the containers reach at the host's address on the docker bridge."""
    # Not under tmp_path: Dovecot's own users must reach the directory (as in conftest).
    root = Path(tempfile.mkdtemp(prefix="mailbeat-dovecot-"))
    dovecot = Dovecot(root, also_listen=engine.bridge_gateway())
    dovecot.start()
    try:
        yield dovecot
    finally:
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def project(tmp_path: Path, engine: Engine) -> Iterator[Project]:
    api_port, flower_port = free_port(), free_port()
    env_file = render(EXAMPLE.read_text()) + "\n".join(
        [
            "# the test's own: S3 off (no MinIO), ports on loopback only, and the Dovecot",
            "# on the host's bridge address allowed by the outbound policy",
            "S3_BUCKET=",
            f"OUTBOUND_ALLOWLIST={engine.bridge_gateway()}/32",
            f"PUBLISH_API_PORT=127.0.0.1:{api_port}",
            f"PUBLISH_FLOWER_PORT=127.0.0.1:{flower_port}",
            "",
        ]
    )
    project = Project(tmp_path / "project", f"mailbeat-e2e-{uuid.uuid4().hex[:8]}", env_file)
    try:
        yield project
    finally:
        # Whatever happened: nothing of this project stays on the engine.
        project("down", "-v", "--remove-orphans", "--timeout", "30")


def _dotenv(project: Project) -> dict[str, str]:
    lines = (project.directory / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_the_compose_file_runs_on_a_docker_engine(
    engine: Engine, bridge_dovecot: Dovecot, project: Project
) -> None:
    dovecot = bridge_dovecot
    settings = _dotenv(project)
    api = Api(f"http://{settings['PUBLISH_API_PORT']}", settings["ADMIN_API_TOKEN"])
    flower_url = f"http://{settings['PUBLISH_FLOWER_PORT']}"
    flower_user, flower_password = settings["FLOWER_BASIC_AUTH"].split(":", 1)
    gateway = engine.bridge_gateway()
    timings: dict[str, float] = {}

    def eventually(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
        try:
            return wait_for(probe, what, timeout, **watched())
        except AssertionError as exc:
            logs = project("logs", "--no-color", "--tail", "60")
            raise AssertionError(f"{exc}\n{logs[-12000:]}") from None

    def up(*extra: str) -> None:
        started = time.monotonic()
        project("up", "-d", *extra, *SERVICES, timeout=1500)
        timings[f"up {' '.join(extra)}".strip()] = time.monotonic() - started

    def state(container: str) -> dict[str, Any]:
        return dict(project.inspect(container)["State"])

    def healthy() -> dict[str, Any] | None:
        """/health says healthy (a worker answers too), and so does docker's health check."""
        body = api("GET", "/health").json()
        (container,) = project.containers("api")
        docker_says = state(container)["Health"]["Status"]
        return body if body["status"] == "healthy" and docker_says == "healthy" else None

    # Every image the named services and the build use is a local one (no registry).
    images = {compose()["services"][name]["image"] for name in ("redis", "postgres")}
    images |= {args for keyword, args in dockerfile() if keyword == "FROM"}
    assert images <= set(STANDIN_DOCKERFILES), images

    # -- up: migrate exits 0, then the API is healthy (storage on local files) ----------
    up("--build")
    (migrate,) = project.containers("migrate")
    assert state(migrate)["ExitCode"] == 0, project("logs", "migrate")
    health = eventually("the API healthy", healthy)
    assert health["checks"]["storage"].startswith("ok: local files"), health

    # -- three workers, seen by the admin API and by Flower ------------------------------
    up("--scale", "celery-worker=3")
    workers = project.containers("celery-worker")
    assert len(workers) == 3
    names = {"celery@" + project.inspect(c)["Config"]["Hostname"] for c in workers}
    # The processor pool (one replica) answers too; only celery-worker was scaled.
    (processor,) = project.containers("celery-processor")
    names.add("celery@" + project.inspect(processor)["Config"]["Hostname"])

    def admin_workers() -> set[str] | None:
        found = worker_names(api("GET", "/admin/celery/workers").json())
        return found if found == names else None

    def flower_workers() -> set[str] | None:
        response = httpx.get(
            flower_url + "/api/workers",
            params={"refresh": "true"},
            auth=(flower_user, flower_password),
            timeout=30,
        )
        found = set(response.json()) if response.status_code == 200 else set()
        return found if names <= found else None

    eventually("3 workers and the processor in /admin/celery/workers", admin_workers)
    eventually("3 workers and the processor in Flower", flower_workers)
    assert httpx.get(flower_url + "/api/workers", timeout=30).status_code == 401

    # -- mail from the host's Dovecot, through the bridge, stored exactly once ------------
    sizes: dict[str, int] = {}
    accounts: dict[str, int] = {}

    def add_mailbox(count: int) -> str:
        username = f"c-{uuid.uuid4().hex[:8]}"
        dovecot.add_user(username, "pw-" + username)
        body = account_body(dovecot, username, ssl=False, interval=INTERVAL_SECONDS)
        accounts[username] = api.create_account({**body, "imap_host": gateway})
        append(username, count)
        return username

    def append(username: str, count: int, tag: str = "") -> None:
        first = sizes.get(username, 0)
        # 40 kB each: enough work that the scale-down below comes while polls run.
        padding = (b"x" * 76 + b"\n") * 512
        raws = [email(f"{username} {tag}{i}") + padding for i in range(first, first + count)]
        dovecot.append_many(username, raws)
        sizes[username] = first + count

    def stored() -> int:
        return sum(api.message_total(account) for account in accounts.values())

    def all_stored() -> bool:
        return all(api.message_total(accounts[u]) == n for u, n in sizes.items())

    first = add_mailbox(30)
    eventually("30 messages from the host's Dovecot", all_stored)
    assert len(set(api.subjects(accounts[first]))) == 30

    # -- scaling down to one worker while mail is being ingested loses nothing ----------
    waiters = {c: subprocess.Popen(["docker", "wait", c], stdout=subprocess.PIPE) for c in workers}
    # Counted before the mailboxes are added: on a busy machine their polls may store all
    # of them while the last is still being filled, and a count taken after that would
    # wait for ingestion that has already happened.
    before = stored()
    busy = [add_mailbox(60) for _ in range(4)]
    eventually("ingestion under way", lambda: stored() - before or None)
    # Mail keeps arriving from a second thread across the scale-down: a fast machine may
    # have stored all of the above by now, but not what is appended once it has begun.
    # At most 100 a mailbox, which the subjects check below reads in one page.
    stop = threading.Event()

    def feed() -> None:
        for _ in range(40):
            for username in busy:
                append(username, 1, "during-scale-down ")
            if stop.wait(0.25):
                return

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    appended = sum(sizes.values())
    up("--scale", "celery-worker=1")
    assert sum(sizes.values()) > appended, "no mail arrived during the scale-down"
    stop.set()
    feeder.join(timeout=60)
    assert not feeder.is_alive()
    left = project.containers("celery-worker")
    assert len(left) == 1
    for container, waiter in waiters.items():
        if container not in left:
            code = waiter.communicate(timeout=60)[0].decode().strip()
            assert code == "0", f"a scaled-down worker exited {code}"
        else:
            waiter.kill()
            waiter.wait()
    eventually(f"all {sum(sizes.values())} messages after the scale-down", all_stored, 600)
    for username, account in accounts.items():
        response = api("GET", f"/accounts/{account}/messages", params={"limit": 100})
        subjects = [item["subject"] for item in response.json()["items"]]
        assert len(subjects) == len(set(subjects)) == sizes[username], username

    # -- beat killed (SIGKILL, a crash): restarted by its policy, and polling resumes -----
    (beat,) = project.containers("celery-beat")
    init = project.inspect(beat)["State"]["Pid"]  # docker-init; celery beat is its child
    (beat_pid,) = map(int, Path(f"/proc/{init}/task/{init}/children").read_text().split())
    os.kill(beat_pid, signal.SIGKILL)
    killed = time.monotonic()
    append(first, 1, "after-beat-kill ")

    def restarted() -> bool:
        beat_state = project.inspect(beat)
        if not (beat_state["State"]["Running"] and beat_state["RestartCount"] >= 1):
            return False
        # The new beat logs this once its SIGTERM handler is in place: stopped before
        # that (a slow start on a loaded machine), it would die of the signal (exit 143).
        return project("logs", "--no-color", "celery-beat").count("beat: Starting...") >= 2

    eventually("beat restarted by its restart policy", restarted)
    eventually("polling resumed after the beat was killed", all_stored, 120)
    timings["beat kill to mail stored"] = time.monotonic() - killed

    # -- stop: every container exits 0; down then up keeps the data --------------------
    total = sum(sizes.values())
    project("stop", "--timeout", "60")
    for service in (*SERVICES, "redis", "postgres"):
        for container in project.containers(service):
            assert state(container)["ExitCode"] == 0, (service, project("logs", service))
    project("down")
    assert project.leftovers()["volumes"], "down removed the volumes"
    up()
    eventually("the API healthy again", healthy)
    assert stored() == total
    item = api("GET", f"/accounts/{accounts[first]}/messages").json()["items"][0]
    raw = api("GET", f"/messages/{item['id']}/raw")
    assert raw.status_code == 200 and b"body of " in raw.content
    append(first, 1, "after-down-up ")
    eventually("polling on the kept schedule after down/up", all_stored)

    # -- down -v: nothing of the project is left ----------------------------------------
    project("down", "-v")
    assert project.leftovers() == {"containers": [], "volumes": [], "networks": []}
    print({name: round(seconds, 1) for name, seconds in timings.items()})


# The `ha` profile's services, with what mailbeat needs to poll (README, "Redis with
# Sentinel"); `redis`, postgres and migrate follow.
HA_SERVICES = (
    "redis-replica",
    "redis-sentinel-1",
    "redis-sentinel-2",
    "redis-sentinel-3",
    "api",
    "celery-beat",
    "celery-worker",
    "celery-processor",
)


def test_the_ha_profile_fails_over_when_the_redis_master_dies(
    engine: Engine, bridge_dovecot: Dovecot, project: Project
) -> None:
    dovecot = bridge_dovecot
    [ha_url] = [
        line.removeprefix("# COMPOSE_REDIS_URL=")
        for line in EXAMPLE.read_text().splitlines()
        if line.startswith("# COMPOSE_REDIS_URL=")
    ]
    # README's way: the profile and the URL in .env (so `down` in the fixture sees them).
    with (project.directory / ".env").open("a") as env_file:
        env_file.write(f"COMPOSE_PROFILES=ha\nCOMPOSE_REDIS_URL={ha_url}\n")
    settings = _dotenv(project)
    api = Api(f"http://{settings['PUBLISH_API_PORT']}", settings["ADMIN_API_TOKEN"])

    def eventually(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
        try:
            return wait_for(probe, what, timeout, **watched())
        except AssertionError as exc:
            logs = project("logs", "--no-color", "--tail", "60")
            raise AssertionError(f"{exc}\n{logs[-12000:]}") from None

    def redis_cli(service: str, *args: str) -> list[str]:
        (container,) = project.containers(service)
        return docker("exec", container, "redis-cli", *args).split()

    def master() -> str:
        """Where the sentinels say the master is."""
        return redis_cli(
            "redis-sentinel-1", "-p", "26379", "sentinel", "get-master-addr-by-name", "mailbeat"
        )[0]

    project("up", "-d", "--build", *HA_SERVICES, timeout=1500)
    health = eventually(
        "the API healthy through the sentinels",
        lambda: (body := api("GET", "/health").json())["status"] == "healthy" and body,
    )
    assert health["checks"]["redis"] == "ok"
    assert master() == "redis"

    username = f"c-{uuid.uuid4().hex[:8]}"
    dovecot.add_user(username, "pw-" + username)
    body = account_body(dovecot, username, ssl=False, interval=INTERVAL_SECONDS)
    account = api.create_account({**body, "imap_host": engine.bridge_gateway()})
    sent = [email(f"{username} {i}") for i in range(5)]
    dovecot.append_many(username, sent)
    eventually("the first messages", lambda: api.message_total(account) == len(sent))

    # A sentinel learns of the replica from the master's INFO, asked every 10 s, and
    # can only promote a replica it knows: a master killed sooner is not replaced.
    eventually(
        "every sentinel to know the replica",
        lambda: all(
            "redis-replica"
            in redis_cli(sentinel, "-p", "26379", "sentinel", "replicas", "mailbeat")
            for sentinel in ("redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3")
        ),
    )
    # The master dies (SIGKILL; `docker kill` also keeps the restart policy from
    # bringing it back): the sentinels promote the replica and polling goes on.
    (old_master,) = project.containers("redis")
    docker("kill", "--signal", "KILL", old_master)
    eventually("the sentinels to promote the replica", lambda: master() == "redis-replica")
    later = [email(f"{username} after {i}") for i in range(3)]
    dovecot.append_many(username, later)
    eventually("mail after the failover", lambda: api.message_total(account) == len(sent) + 3)
    subjects = api.subjects(account)
    assert len(subjects) == len(set(subjects)) == len(sent) + 3
    eventually(
        "/health to read Redis through the new master",
        lambda: api("GET", "/health").json()["checks"]["redis"] == "ok",
    )

    # The old master comes back as a replica of the new one.
    docker("start", old_master)
    eventually(
        "the old master to follow the new one", lambda: redis_cli("redis", "role")[0] == "slave"
    )
