"""The deployment files, parsed for the tests: docker-compose.yml, Dockerfile, .env.example."""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent

# docs/architecture.md, "Processes and commands": compose runs exactly these.
DESIGN_COMMANDS = {
    "api": "uvicorn backend.main:app --host 0.0.0.0 --port 8000 "
    "--http backend.serving:BoundedHttpProtocol",
    "celery-worker": "celery -A backend.celery_app worker -Q email",
    "celery-processor": "celery -A backend.celery_app worker -Q workflow,default",
    "celery-beat": "celery -A backend.celery_app beat",
    "watcher": "python -m backend.cli watch",
    "flower": "celery -A backend.celery_app flower --port=5555",
    "migrate": "alembic upgrade head",
}


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    value = compose()["services"][name]
    assert isinstance(value, dict)
    return value


def command(name: str) -> list[str]:
    value = service(name)["command"]
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def interpolated_names() -> set[str]:
    """Every ${NAME...} the compose file takes from the environment or .env."""
    text = (ROOT / "docker-compose.yml").read_text()
    return set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))


def example_names() -> list[str]:
    """The settings .env.example lists, set or commented out (`# NAME=...`)."""
    text = (ROOT / ".env.example").read_text()
    return re.findall(r"^(?:# ?)?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)


def example_values() -> dict[str, str]:
    text = (ROOT / ".env.example").read_text()
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, flags=re.MULTILINE))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not exec form: {arguments}"
    return [str(part) for part in value]
