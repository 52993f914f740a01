"""docker-compose.yml, checked for what a Docker engine would only reveal in production."""

from __future__ import annotations

import re
import shlex

import pytest

from backend.config import Settings
from tests.deploy.files import (
    DESIGN_COMMANDS,
    ROOT,
    command,
    compose,
    example_names,
    example_values,
    interpolated_names,
    service,
)

WORKERS = ("celery-worker", "celery-processor")
APP_SERVICES = ("migrate", "api", "celery-beat", *WORKERS, "watcher", "flower")
SENTINELS = ("redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3")
HA = ("redis-replica", *SENTINELS)
LONG_RUNNING = (
    "redis",
    "postgres",
    "minio",
    "api",
    "celery-beat",
    *WORKERS,
    "watcher",
    "flower",
    *HA,
)
ONE_SHOT = ("migrate", "minio-init")


def _duration_seconds(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_every_service_of_the_design_is_there() -> None:
    assert set(compose()["services"]) == {
        "redis",
        "postgres",
        "minio",
        "minio-init",
        "migrate",
        "api",
        "celery-beat",
        "celery-worker",
        "celery-processor",
        "watcher",
        "flower",
        *HA,
    }
    # Redis with Sentinel only when asked for (`--profile ha`); everything else always.
    profiled = {name for name in compose()["services"] if "profiles" in service(name)}
    assert profiled == set(HA)
    assert all(service(name)["profiles"] == ["ha"] for name in HA)


@pytest.mark.parametrize("name", sorted(DESIGN_COMMANDS))
def test_commands_are_the_designs(name: str) -> None:
    assert command(name) == DESIGN_COMMANDS[name].split()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_the_image_with_the_env_file(name: str) -> None:
    spec = service(name)
    assert spec["build"]["context"] == "."
    assert spec["image"] == "mailbeat:latest"
    assert spec["env_file"] == ".env"
    assert spec["environment"]["ENVIRONMENT"] == "production"
    assert spec["init"] is True  # SIGTERM reaches Celery, so a scale-down is a warm shutdown


@pytest.mark.parametrize("name", WORKERS)
def test_the_workers_scale(name: str) -> None:
    worker = service(name)
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker  # each replica is named after its own container id
    assert worker.get("deploy", {}).get("replicas") is None


def _queues(name: str) -> set[str]:
    args = command(name)
    return set(args[args.index("-Q") + 1].split(","))


def test_polls_and_processing_have_separate_pools() -> None:
    # A backlog of message.process / webhook.deliver must never hold the slots polls need.
    assert _queues("celery-worker") == {"email"}
    assert _queues("celery-processor") == {"workflow", "default"}
    # Together they serve every queue Celery routes to: no task is left unconsumed.
    from backend.celery_app import app

    declared = {queue.name for queue in app.conf.task_queues}
    assert _queues("celery-worker") | _queues("celery-processor") == declared


@pytest.mark.parametrize("name", WORKERS)
def test_a_scaled_down_worker_finishes_its_tasks(name: str) -> None:
    grace = _duration_seconds(service(name)["stop_grace_period"])
    assert grace > int(example_values()["POLL_TIME_LIMIT_SECONDS"])
    assert Settings().poll_time_limit_seconds < grace


def test_one_beat_and_no_name_global_to_the_host() -> None:
    # A container_name is global to the Docker host: a second copy of the project (another
    # project name) could not start its beat. RedBeat's lock keeps a second beat idle
    # (tests/e2e/test_scheduling.py); the file itself asks for one.
    for name in compose()["services"]:
        assert "container_name" not in service(name), name
    beat = service("celery-beat")
    assert "deploy" not in beat and "scale" not in beat


def test_ports_can_stay_off_the_network() -> None:
    # PUBLISH_API_PORT=127.0.0.1:8000 publishes on loopback only; two copies use two ports.
    assert service("api")["ports"] == ["${PUBLISH_API_PORT:-8000}:8000"]
    assert service("flower")["ports"] == ["${PUBLISH_FLOWER_PORT:-5555}:5555"]
    assert example_values()["PUBLISH_API_PORT"] == "8000"
    assert example_values()["PUBLISH_FLOWER_PORT"] == "5555"
    # Flower reads every FLOWER_* variable of its environment (.env) as its option.
    assert [name for name in example_names() if name.startswith("FLOWER_")] == ["FLOWER_BASIC_AUTH"]


def test_postgres_is_healthy_only_once_it_answers_over_tcp() -> None:
    # pg_isready alone checks the unix socket, which the image's first start serves
    # before TCP; migrate (no restart) would then fail and nothing else would start.
    check = " ".join(service("postgres")["healthcheck"]["test"][1:])
    assert "pg_isready -h 127.0.0.1 " in check


def test_pip_proxy_settings_reach_the_build() -> None:
    args = set(service("api")["build"]["args"])
    assert args == {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "EXTRA_CA_CERTS"}


def test_redis_never_evicts_and_persists() -> None:
    redis = service("redis")
    args = command("redis")
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_the_ha_profile_replicates_redis_and_its_sentinels_watch_it() -> None:
    replica = command("redis-replica")
    assert replica[replica.index("--replicaof") + 1 :][:2] == ["redis", "6379"]
    # A replica that becomes the master must not evict either, and keeps its data.
    assert replica[replica.index("--maxmemory-policy") + 1] == "noeviction"
    assert replica[replica.index("--appendonly") + 1] == "yes"
    assert "redis-replica-data:/data" in service("redis-replica")["volumes"]
    # Each announces its service name, stable across restarts (its address is not).
    for name in ("redis", "redis-replica"):
        args = command(name)
        assert args[args.index("--replica-announce-ip") + 1] == name
    master = service("api")["environment"]["REDIS_SENTINEL_MASTER"]
    for name in SENTINELS:
        assert service(name) == service(SENTINELS[0])
    script = command(SENTINELS[0])[-1]
    assert f"'sentinel monitor {master} redis 6379 2'" in script  # a quorum of 2 of 3
    assert "'sentinel resolve-hostnames yes'" in script
    assert script.endswith("exec redis-server /data/sentinel.conf --sentinel")


def test_the_ha_url_names_the_three_sentinels() -> None:
    # The line .env.example offers (commented out) for COMPOSE_REDIS_URL.
    text = (ROOT / ".env.example").read_text()
    [url] = re.findall(r"^# COMPOSE_REDIS_URL=(.*)$", text, flags=re.MULTILINE)
    assert url == ";".join(f"sentinel://{name}:26379" for name in SENTINELS) + "/0"
    for name in APP_SERVICES:
        env = service(name)["environment"]
        assert env["REDIS_URL"] == "${COMPOSE_REDIS_URL:-redis://redis:6379/0}", name
        assert env["REDIS_SENTINEL_MASTER"] == "mailbeat", name


def test_postgres_keeps_its_data_in_a_volume() -> None:
    volumes = service("postgres")["volumes"]
    assert "postgres-data:/var/lib/postgresql/data" in volumes
    assert "postgres-data" in compose()["volumes"]


HEALTH_PROBES = {
    # What each check must run: a probe of the service itself, on the port it serves.
    "redis": ["CMD", "redis-cli", "ping"],
    "redis-replica": ["CMD", "redis-cli", "ping"],
    **{name: ["CMD", "redis-cli", "-p", "26379", "ping"] for name in SENTINELS},
    "minio": ["CMD", "mc", "ready", "local"],
}


@pytest.mark.parametrize("name", ["redis", "postgres", "minio", "api", *HA])
def test_health_checks(name: str) -> None:
    check = service(name)["healthcheck"]
    if name == "api":
        port = command("api")[command("api").index("--port") + 1]
        assert check["test"][:3] == ["CMD", "python", "-c"]
        probe = check["test"][3]
        assert f"'http://127.0.0.1:{port}/health'" in probe
        # The probe's own timeout ends before the check's, so a hung API counts as a failure.
        probe_timeout = float(re.findall(r"timeout=(\d+(?:\.\d+)?)", probe)[0])
        assert probe_timeout < _duration_seconds(check["timeout"])
    elif name == "postgres":
        assert check["test"][0] == "CMD-SHELL"
        args = shlex.split(check["test"][1])
        env = service("postgres")["environment"]
        assert args[0] == "pg_isready"
        # Over TCP, as the app connects, as the user and database the image creates.
        options = dict(zip(args[1::2], args[2::2], strict=True))
        assert options == {"-h": "127.0.0.1", "-U": env["POSTGRES_USER"], "-d": env["POSTGRES_DB"]}
    else:
        assert check["test"] == HEALTH_PROBES[name]
    assert 0 < _duration_seconds(check["timeout"]) < _duration_seconds(check["interval"])
    assert isinstance(check["retries"], int) and check["retries"] >= 3


def test_services_wait_for_what_they_need() -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in service(name)["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert conditions("minio-init") == {"minio": "service_healthy"}
    # Not MinIO: storage falls back to local files until it answers, so mailbeat starts
    # without it, and the file needs no `required: false` (Compose >= 2.20 only).
    backend = {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    for name in ("api", *WORKERS, "celery-beat", "watcher"):
        assert conditions(name) == backend, name
    assert conditions("flower") == {"redis": "service_healthy"}
    for name in compose()["services"]:
        for dep in service(name).get("depends_on", {}).values():
            assert set(dep) == {"condition"}, f"{name}: Compose 1.29 knows only condition"
    # Whatever is waited on as healthy has a health check to wait on.
    for name in compose()["services"]:
        for dep, condition in conditions(name).items() if "depends_on" in service(name) else []:
            if condition == "service_healthy":
                assert "healthcheck" in service(dep), f"{name} waits for {dep}'s health"


def test_restart_policies() -> None:
    for name in LONG_RUNNING:
        assert service(name)["restart"] == "on-failure", name
    for name in ONE_SHOT:
        assert service(name)["restart"] == "no", name


def test_minio_creates_the_bucket_the_app_uses() -> None:
    init = " ".join(str(part) for part in service("minio-init")["command"])
    assert "mc mb --ignore-existing" in init
    assert service("minio-init")["environment"]["S3_BUCKET"] == "${S3_BUCKET:-mailbeat}"
    env = service("api")["environment"]
    # Unset: MinIO's bucket. Set but empty (`S3_BUCKET=` in .env): S3 off, local files;
    # `:-` would turn that choice back into the default.
    assert env["S3_BUCKET"] == "${S3_BUCKET-mailbeat}"
    assert env["S3_ENDPOINT_URL"] == "${S3_ENDPOINT_URL-http://minio:9000}"
    # .env.example leaves them unset (commented out), so a copied .env keeps MinIO.
    assert "S3_BUCKET" not in example_values() and "S3_BUCKET" in example_names()
    assert "S3_ENDPOINT_URL" not in example_values()
    assert env["S3_ADDRESSING_STYLE"] == "path"
    assert env["S3_ACCESS_KEY_ID"] == service("minio")["environment"]["MINIO_ROOT_USER"]
    assert env["S3_SECRET_ACCESS_KEY"] == service("minio")["environment"]["MINIO_ROOT_PASSWORD"]


def test_api_and_workers_share_the_data_volume() -> None:
    # Local-fallback objects written by a worker are read by the API; metrics files too.
    for name in ("api", *WORKERS, "watcher"):
        assert "app-data:/app/data" in service(name)["volumes"]
        assert service(name)["environment"]["DATA_DIR"] == "/app/data"


def test_flower_has_a_login() -> None:
    flower = service("flower")
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_secrets_are_required_not_defaulted() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "FLOWER_BASIC_AUTH"):
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, name
        assert all(use.startswith(":?") for use in uses), f"{name} must not have a default"


def test_every_variable_compose_uses_is_in_env_example() -> None:
    listed = set(example_names())
    assert interpolated_names() - listed == set()
    for name in APP_SERVICES:
        assert set(service(name)["environment"]) - listed == set(), name


def test_env_example_lists_every_setting_and_only_settings_or_compose_variables() -> None:
    listed = example_names()
    assert len(listed) == len(set(listed)), "a name appears twice in .env.example"
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - set(listed) == set(), "settings missing from .env.example"
    assert set(listed) - settings - interpolated_names() == set(), "unknown names"


def test_workers_beat_and_flower_have_health_checks() -> None:
    """Each probes the service itself: a worker answers a ping as its own node, beat holds
    RedBeat's lock, Flower listens on its port."""
    for name in ("celery-worker", "celery-processor"):
        check = service(name)["healthcheck"]
        assert check["test"][0] == "CMD-SHELL"
        assert "inspect ping -d celery@$$HOSTNAME" in check["test"][1], name
    beat = service("celery-beat")["healthcheck"]["test"]
    assert beat[:3] == ["CMD", "python", "-c"] and "redbeat_key_prefix + ':lock'" in beat[3]
    flower = service("flower")["healthcheck"]["test"]
    port = command("flower")[-1].removeprefix("--port=")
    assert f"('127.0.0.1', {port})" in flower[3]
    watcher = service("watcher")["healthcheck"]["test"]
    assert watcher[:3] == ["CMD", "python", "-c"] and "leases import alive" in watcher[3]
    for name in ("celery-worker", "celery-processor", "celery-beat", "watcher", "flower"):
        check = service(name)["healthcheck"]
        assert 0 < _duration_seconds(check["timeout"]) < _duration_seconds(check["interval"])
        assert check["retries"] >= 3


def test_third_party_images_are_pinned() -> None:
    for name, spec in compose()["services"].items():
        image = spec.get("image", "")
        if image and not image.startswith("mailbeat:"):
            assert not image.endswith(":latest") and ":" in image, (name, image)
