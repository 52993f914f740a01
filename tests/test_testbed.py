"""Each fixture of the test bed does what later tests rely on."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from tests.support.dovecot import Dovecot
from tests.support.redis_db import RedisDb
from tests.support.s3 import MotoS3


def test_dovecot_plain_and_tls(dovecot: Dovecot, mail_user: tuple[str, str]) -> None:
    username, password = mail_user
    uid = dovecot.append(username, b"Subject: hello\r\n\r\nbody\r\n")
    assert uid == 1
    with dovecot.client(username, ssl=True) as client:
        info = client.select_folder("INBOX", readonly=True)
        assert info[b"EXISTS"] == 1
        client.logout()
    # The generated certificate is not trusted by default.
    with pytest.raises(ssl.SSLError):
        IMAPClient(dovecot.host, port=dovecot.imaps_port, ssl=True, timeout=5)
    with (
        IMAPClient(dovecot.host, port=dovecot.imap_port, ssl=False, timeout=5) as client,
        pytest.raises(LoginError),
    ):
        client.login(username, password + "-wrong")


def test_dovecot_uidvalidity_reset_keeps_the_mail(
    dovecot: Dovecot, mail_user: tuple[str, str]
) -> None:
    username, _ = mail_user
    dovecot.append_many(username, [b"Subject: 1\r\n\r\na\r\n", b"Subject: 2\r\n\r\nb\r\n"])
    before = dovecot.folder_status(username)
    dovecot.reset_uidvalidity(username)
    after = dovecot.folder_status(username)
    assert after[b"UIDVALIDITY"] != before[b"UIDVALIDITY"]
    assert after[b"MESSAGES"] == 2


def test_dovecot_maildir_drop(dovecot: Dovecot, mail_user: tuple[str, str]) -> None:
    username, _ = mail_user
    dovecot.write_maildir(username, [b"Subject: x\r\n\r\ny\r\n"] * 3, folder="Archive")
    assert dovecot.folder_status(username, "Archive")[b"MESSAGES"] == 3


def test_redis_index_is_private(redis_db: RedisDb) -> None:
    assert redis_db.index is not None and redis_db.index > 0
    client = redis_db.client()
    assert client.dbsize() == 0
    client.set("probe", "1")
    assert client.get("probe") == b"1"


def test_moto_s3_server(moto_s3: MotoS3, s3_bucket: str) -> None:
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="a/b", Body=b"data")
    assert client.get_object(Bucket=s3_bucket, Key="a/b")["Body"].read() == b"data"


ROOT = Path(__file__).resolve().parents[1]


def _run_pytest(tmp_path: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """pytest with the skip guard on a few small test files, with the repository's ini
    file (so `xfail_strict` applies as in the suite)."""
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider"),
            *("-p", "tests.support.no_skips", "-c", str(ROOT / "pyproject.toml")),
            *("--rootdir", str(tmp_path), *files),
        ],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


NOT_RUN = """import pytest


@pytest.mark.skip(reason="later")
def test_skip_mark():
    pass


def test_skip_call():
    pytest.skip("no service")


@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False


@pytest.mark.xfail(reason="known")
def test_xpass():
    pass


def test_passes():
    pass
"""


def test_a_skip_or_xfail_fails_the_run(tmp_path: Path) -> None:
    done = _run_pytest(
        tmp_path,
        {
            "test_not_run.py": NOT_RUN,
            "test_skipped_module.py": "import pytest\n\npytest.importorskip('no_such_mod')\n",
        },
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    guard = done.stdout.split("no test may be skipped or xfailed")[1]
    for name in ("skip_mark", "skip_call", "xfail"):
        assert f"test_not_run.py::test_{name}\n" in guard, done.stdout
    assert "skipped: test_skipped_module.py" in guard
    assert "1 failed" in done.stdout  # the xpass, by xfail_strict
    # The only problem is a skip: still a failed run.
    only_skip = _run_pytest(
        tmp_path,
        {"test_skipped_module.py": "import pytest\npytest.skip('x', allow_module_level=True)\n"},
    )
    assert only_skip.returncode == pytest.ExitCode.TESTS_FAILED, only_skip.stdout


def test_the_guard_lets_a_passing_run_pass(tmp_path: Path) -> None:
    done = _run_pytest(tmp_path, {"test_fine.py": "def test_x():\n    assert 1 + 1 == 2\n"})
    assert done.returncode == pytest.ExitCode.OK, done.stdout


def test_ci_clears_pytest_options_from_the_environment(tmp_path: Path) -> None:
    """.ci/run with a `make` that reports what it was given: a PYTEST_ADDOPTS or
    PYTEST_ARGS left in CI's environment (say `-k nothing`) must not reach pytest."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    make = fake_bin / "make"
    make.write_text(
        "#!/bin/sh\n"
        'echo "ADDOPTS=${PYTEST_ADDOPTS-unset} ARGS=${PYTEST_ARGS-unset} $*" > "$MAKE_SEEN"\n'
    )
    make.chmod(0o755)
    seen = tmp_path / "seen"
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "MAKE_SEEN": str(seen),
        "PYTEST_ADDOPTS": "-k nothing_at_all",
        "PYTEST_ARGS": "--co",
    }
    subprocess.run([str(ROOT / ".ci" / "run")], env=env, check=True, timeout=120)
    assert seen.read_text().split() == ["ADDOPTS=unset", "ARGS=unset", "test"]
