from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.fernet import Fernet

from backend import crypto


def test_round_trip_and_ciphertext_hides_the_secret() -> None:
    token = crypto.encrypt_json({"password": "hunter2"})
    assert "hunter2" not in token
    assert crypto.decrypt_json(token) == {"password": "hunter2"}


def test_key_rotation(set_env: Callable[..., None]) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    set_env(ENCRYPTION_KEY=old)
    token = crypto.encrypt("s3cret")

    # A new key goes first; the old one stays in the list so existing secrets still read.
    set_env(ENCRYPTION_KEY=f"{new},{old}")
    assert crypto.decrypt(token) == "s3cret"
    rotated = crypto.rotate(token)

    # Once rotated, the old key can be dropped.
    set_env(ENCRYPTION_KEY=new)
    assert crypto.decrypt(rotated) == "s3cret"
    with pytest.raises(crypto.SecretDecryptError, match="ENCRYPTION_KEY"):
        crypto.decrypt(token)


def test_bad_key_is_explained(set_env: Callable[..., None]) -> None:
    set_env(ENCRYPTION_KEY="not-a-fernet-key")
    with pytest.raises(ValueError, match="Fernet keys"):
        crypto.encrypt("x")


def test_a_lone_surrogate_is_kept_not_an_error() -> None:
    # "\ud800" in JSON is a str Python holds but UTF-8 cannot encode: encrypt used to
    # raise UnicodeEncodeError naming the character and its position (a 500 on create).
    for secret in ("\ud800", "pre\udfffpost"):
        assert crypto.decrypt(crypto.encrypt(secret)) == secret
    assert crypto.decrypt_json(crypto.encrypt_json({"s": "\ud800"})) == {"s": "\ud800"}
