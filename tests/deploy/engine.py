"""A Docker engine for the compose test: dockerd (started here when none answers), the
stand-in images the project's files name, and a compose project in a directory of its own.

No container registry is reachable, so every image the test starts is built on this
machine: a Debian bookworm base from debootstrap, and on it the stand-ins in standins/,
tagged as docker-compose.yml and the Dockerfile name them. They are kept between runs
(dockerd's data stays in /var/lib/docker); a tag that exists is not rebuilt, unless it is
a stand-in built from other files (see STANDIN_LABEL). A real image under the same tag is
used as it is, never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.deploy.files import ROOT, dockerfile
from tests.support.processes import stop_group

STANDINS = Path(__file__).resolve().parent / "standins"
BASE_IMAGE = "mailbeat-standin/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Image name -> the stand-in's Dockerfile. MinIO's images are not here: the test runs
# the documented route without MinIO (README, "Without MinIO").
STANDIN_DOCKERFILES = {
    "python:3.11-slim-bookworm": "python.Dockerfile",
    "redis:7.4-alpine": "redis.Dockerfile",
    "postgres:16-alpine": "postgres.Dockerfile",
}
STANDIN_LABEL = "mailbeat.standin"  # its value: a hash of the files it was built from
BUILD_TIMEOUT = 1200.0


class DockerError(AssertionError):
    pass


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run a docker or compose command; its output, or a failure that shows it."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DockerError(f"{' '.join(argv)}: no end within {timeout:.0f}s") from exc
    if done.returncode != 0:
        output = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        raise DockerError(f"{' '.join(argv)} exited {done.returncode}:\n{output}")
    return done.stdout


def docker(*args: str, timeout: float = 120.0) -> str:
    return run(["docker", *args], timeout)


def answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


class Engine:
    """dockerd: the one running, or one started here (and stopped by stop())."""

    def __init__(self, log_dir: Path) -> None:
        self.log_path = log_dir / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for program in ("docker", "dockerd", "docker-compose", "debootstrap"):
            if shutil.which(program) is None:
                raise DockerError(f"{program} is not installed (.ci/run installs it)")
        if answers():
            return
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while not answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-4000:]
                raise DockerError(f"dockerd did not start:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, timeout=60)
            self.process = None

    def bridge_gateway(self) -> str:
        """The host's address on Docker's default bridge: containers reach the host there."""
        (bridge,) = json.loads(docker("network", "inspect", "bridge"))
        interface = bridge["Options"]["com.docker.network.bridge.name"]
        shown = run(["ip", "-4", "-o", "addr", "show", "dev", interface], 10)
        return shown.split(" inet ", 1)[1].split("/", 1)[0]

    # -- stand-in images -------------------------------------------------------------

    def ensure_standins(self) -> None:
        for image, name in STANDIN_DOCKERFILES.items():
            digest = _files_digest(STANDINS / name, *_copied_files(STANDINS / name))
            labels = _labels(image)
            if labels is not None and labels.get(STANDIN_LABEL, digest) == digest:
                continue  # built before from these files, or a real image
            self._ensure_base()
            docker(
                "build",
                "--label",
                f"{STANDIN_LABEL}={digest}",
                "-f",
                str(STANDINS / name),
                "-t",
                image,
                str(STANDINS),
                timeout=BUILD_TIMEOUT,
            )

    def _ensure_base(self) -> None:
        if _labels(BASE_IMAGE) is not None:
            return
        with tempfile.TemporaryDirectory(prefix="mailbeat-rootfs-") as rootfs:
            run(
                ["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR],
                BUILD_TIMEOUT,
            )
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                imported = subprocess.run(
                    ["docker", "import", "-", BASE_IMAGE],
                    stdin=tar.stdout,
                    capture_output=True,
                    timeout=BUILD_TIMEOUT,
                    check=False,
                )
            finally:
                tar.wait()
            if imported.returncode != 0 or tar.returncode != 0:
                raise DockerError(f"docker import: {imported.stderr.decode()[-2000:]}")


def _labels(image: str) -> dict[str, str] | None:
    """The image's labels ({} if none), or None when there is no such image."""
    found = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        return None
    labels = json.loads(found.stdout)[0]["Config"].get("Labels")
    return dict(labels or {})


def _copied_files(dockerfile_path: Path) -> list[Path]:
    return [
        STANDINS / line.split()[1]
        for line in dockerfile_path.read_text().splitlines()
        if line.startswith("COPY ")
    ]


def _files_digest(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# -- what pip on this host uses, for pip inside the image build ------------------------


def pip_build_args() -> dict[str, str]:
    """The Dockerfile's build arguments from this host's pip set-up: its index settings
    (http(s) ones only: a file:// index on the host is not in the build) and the CA
    certificates this machine added to the trust store its pip uses (a proxy that
    re-signs TLS needs them; the image's own store does not have them)."""
    config = _pip_config()
    args: dict[str, str] = {}
    for option in ("index-url", "extra-index-url", "trusted-host"):
        name = "PIP_" + option.upper().replace("-", "_")
        value = os.environ.get(name) or config.get(option, "")
        kept = [v for v in value.split() if option == "trusted-host" or v.startswith("http")]
        if kept:
            args[name] = " ".join(kept)
    local_cas = sorted(Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    if local_cas:
        args["EXTRA_CA_CERTS"] = "\n".join(path.read_text().strip() for path in local_cas)
    return args


def _pip_config() -> dict[str, str]:
    """`pip config list` as {option: value}, the last scope winning."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    config: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.rsplit(".", 1)[-1]] = value.strip("'\"")
    return config


# -- a compose project -----------------------------------------------------------------


class Project:
    """docker-compose.yml (the project's own, as it is) in a directory of its own with the
    files its build needs and a .env, under a project name of its own."""

    def __init__(self, directory: Path, name: str, env_file: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True)
        copied = {"Dockerfile", ".dockerignore", "docker-compose.yml"}
        copied |= {args.split()[0] for keyword, args in dockerfile() if keyword == "COPY"}
        for name_ in copied:
            source = ROOT / name_
            if source.is_dir():
                shutil.copytree(
                    source, directory / name_, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, directory / name_)
        (directory / ".env").write_text(env_file)
        self.env = {**os.environ, **pip_build_args()}

    def __call__(self, *args: str, timeout: float = 300.0) -> str:
        argv = ["docker-compose", "--ansi", "never", "-p", self.name, "--project-directory"]
        argv += [str(self.directory), "-f", str(self.directory / "docker-compose.yml"), *args]
        return run(argv, timeout, env=self.env)

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service).split()

    def inspect(self, container: str) -> dict[str, Any]:
        value = json.loads(docker("inspect", container))[0]
        assert isinstance(value, dict)
        return value

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project is still on the engine: containers, volumes, networks."""
        label = f"label=com.docker.compose.project={self.name}"
        return {
            "containers": docker("ps", "-aq", "--filter", label).split(),
            "volumes": docker("volume", "ls", "-q", "--filter", label).split(),
            "networks": docker("network", "ls", "-q", "--filter", label).split(),
        }
