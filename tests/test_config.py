from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from backend.config import Settings, UnsafeSettingsError

STRONG_TOKEN = "t" * 32


def _clear(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ADMIN_API_TOKEN", "ENCRYPTION_KEY", "ENVIRONMENT", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_development_starts_with_nothing_set(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _clear(monkeypatch)
    monkeypatch.chdir(tmp_path)  # no .env here
    settings = Settings(data_dir=tmp_path)
    assert settings.environment == "development"
    assert settings.database_url.startswith("sqlite:///")
    assert not settings.s3_enabled
    # A development key and token are generated once and then reused.
    keys = settings.fernet_keys()
    assert keys == settings.fernet_keys()
    Fernet(keys[0])
    token = settings.admin_token()
    assert len(token) >= 32
    assert token == Settings(data_dir=tmp_path).admin_token()


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "ADMIN_API_TOKEN, ENCRYPTION_KEY"),
        ({"ADMIN_API_TOKEN": "t"}, "ENCRYPTION_KEY"),
        ({"ENCRYPTION_KEY": "k"}, "ADMIN_API_TOKEN"),
        ({"ADMIN_API_TOKEN": "  ", "ENCRYPTION_KEY": "k"}, "ADMIN_API_TOKEN"),
    ],
)
def test_production_refuses_unsafe_defaults(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], missing: str
) -> None:
    _clear(monkeypatch)
    monkeypatch.setenv("ENVIRONMENT", "production")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises((UnsafeSettingsError, ValidationError), match=missing):
        Settings()


def test_production_with_secrets_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear(monkeypatch)
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("ADMIN_API_TOKEN", STRONG_TOKEN)
    monkeypatch.setenv("ENCRYPTION_KEY", f"{key}, {Fernet.generate_key().decode()}")
    settings = Settings()
    assert settings.admin_token() == STRONG_TOKEN
    assert settings.fernet_keys()[0] == key.encode()
    assert len(settings.fernet_keys()) == 2


def test_redbeat_url_defaults_to_redis_url() -> None:
    settings = Settings(redis_url="redis://example:6379/3")
    assert settings.effective_redbeat_redis_url == "redis://example:6379/3"
    settings = Settings(redis_url="redis://a/1", redbeat_redis_url="redis://b/2")
    assert settings.effective_redbeat_redis_url == "redis://b/2"


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAP_CA_BUNDLE", "")
    monkeypatch.setenv("S3_BUCKET", "")
    settings = Settings()
    assert settings.imap_ca_bundle is None
    assert not settings.s3_enabled


def test_imap_id_is_a_json_object_within_rfc_2971(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAP_ID", '{"name": "helpdesk"}')
    assert Settings().imap_id == {"name": "helpdesk"}
    monkeypatch.setenv("IMAP_ID", "{}")
    assert Settings().imap_id == {}
    for bad in ('{"name": "\u90ae\u4ef6"}', '{"n": "a\\r\\nb"}', '{"%s": "x"}' % ("k" * 31)):
        monkeypatch.setenv("IMAP_ID", bad)
        with pytest.raises(ValidationError, match="IMAP_ID"):
            Settings()


@pytest.mark.parametrize(
    ("token", "key", "named"),
    [
        ("a", Fernet.generate_key().decode(), "ADMIN_API_TOKEN must be at least 32 characters"),
        ("t" * 31, Fernet.generate_key().decode(), "ADMIN_API_TOKEN must be at least 32"),
        (STRONG_TOKEN, "x", "ENCRYPTION_KEY must be one or more comma-separated Fernet keys"),
        (STRONG_TOKEN, f"{Fernet.generate_key().decode()},short", "ENCRYPTION_KEY must be"),
    ],
)
def test_production_refuses_weak_secrets(
    monkeypatch: pytest.MonkeyPatch, token: str, key: str, named: str
) -> None:
    # Issue 31: ADMIN_API_TOKEN=a and ENCRYPTION_KEY=x started in production.
    _clear(monkeypatch)
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("ADMIN_API_TOKEN", token)
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    with pytest.raises(UnsafeSettingsError, match=named) as raised:
        Settings()
    assert "make env" in str(raised.value)  # and how to make good ones
