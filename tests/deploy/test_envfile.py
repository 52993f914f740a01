"""The .env a fresh machine gets: generated once, never overwritten, and usable."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from backend.config import Settings
from backend.envfile import GENERATED, ensure_env_file, main
from tests.deploy.files import ROOT, example_names


def _values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {name: value for name, value in pairs if not name.startswith("#")}


def test_written_from_the_example_with_generated_secrets(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    assert ensure_env_file(path) is True
    values = _values(path)
    Fernet(values["ENCRYPTION_KEY"].encode())  # a valid key, or this raises
    assert len(values["ADMIN_API_TOKEN"]) >= 40
    user, _, password = values["FLOWER_BASIC_AUTH"].partition(":")
    assert user and len(password) >= 20
    assert values["POSTGRES_PASSWORD"] and values["MINIO_ROOT_PASSWORD"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Every setting of the example is still there to edit, set or commented out.
    text = path.read_text()
    for name in example_names():
        assert f"{name}=" in text, name


def test_two_files_get_different_secrets(tmp_path: Path) -> None:
    ensure_env_file(tmp_path / "a")
    ensure_env_file(tmp_path / "b")
    a, b = _values(tmp_path / "a"), _values(tmp_path / "b")
    for name in GENERATED:
        assert a[name] != b[name], name


def test_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    ensure_env_file(path)
    first = path.read_text()
    assert ensure_env_file(path) is False
    assert path.read_text() == first
    path.write_text("ADMIN_API_TOKEN=mine\n")
    assert ensure_env_file(path) is False
    assert path.read_text() == "ADMIN_API_TOKEN=mine\n"


def test_no_empty_assignment_is_left(tmp_path: Path) -> None:
    # An empty NAME= reads as "" rather than unset: IMAP_CA_BUNDLE= would mean the path ".".
    path = tmp_path / ".env"
    ensure_env_file(path)
    assert all(value.strip() for value in _values(path).values())


def test_settings_read_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / ".env"
    ensure_env_file(path)
    for name in example_names():
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=path, environment="production")
    assert settings.admin_api_token is not None
    assert settings.admin_api_token.get_secret_value() == _values(path)["ADMIN_API_TOKEN"]
    assert settings.imap_ca_bundle is None
    assert not settings.s3_enabled
    assert len(settings.fernet_keys()) == 1


def test_generated_names_are_in_the_example() -> None:
    assert set(GENERATED) <= set(example_names())
    assert (ROOT / ".env.example").exists()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / ".env")])
    assert "wrote" in capsys.readouterr().out
    main([str(tmp_path / ".env")])
    assert "left as it is" in capsys.readouterr().out
