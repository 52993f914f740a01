"""Write `.env` on a fresh machine: `.env.example` with its secrets generated.

Standard library only, so `python3 -m backend.envfile` works before any dependency is
installed (docker compose needs the file as much as `make run` does). An existing file is
never touched: it may hold the only copy of the key that decrypts the stored passwords.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / ".env.example"


def _fernet_key() -> str:
    # What cryptography's Fernet.generate_key() returns, without importing it.
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


GENERATED: dict[str, Callable[[], str]] = {
    "ADMIN_API_TOKEN": lambda: secrets.token_urlsafe(32),
    "ENCRYPTION_KEY": _fernet_key,
    "POSTGRES_PASSWORD": lambda: secrets.token_urlsafe(24),
    "MINIO_ROOT_PASSWORD": lambda: secrets.token_urlsafe(24),
    "FLOWER_BASIC_AUTH": lambda: "admin:" + secrets.token_urlsafe(18),
}


def render(example: str) -> str:
    """The example with secrets filled in and other empty settings commented out: an empty
    `NAME=` is read as an empty string, not as unset (an empty path would mean `.`)."""
    lines = [
        "# Written by `make run` / `python3 -m backend.envfile` from .env.example; edit freely.",
        "# Keep ENCRYPTION_KEY: without it the stored mailbox passwords cannot be read.",
    ]
    for line in example.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and not value.strip():
            lines.append(f"{name}={GENERATED[name]()}" if name in GENERATED else f"# {line}")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def ensure_env_file(path: Path, example: Path = EXAMPLE) -> bool:
    """Write `path` from `example` unless it exists; True when it was written."""
    if path.exists():
        return False
    content = render(example.read_text())
    try:
        # O_EXCL: two starts racing cannot both write, and neither overwrites the other.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return True


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else ".env")
    if ensure_env_file(path):
        print(f"wrote {path} with a generated admin token, encryption key and passwords")
    else:
        print(f"{path} exists; left as it is")


if __name__ == "__main__":
    main()
