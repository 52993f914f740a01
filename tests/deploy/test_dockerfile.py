"""The Dockerfile and .dockerignore, checked without a Docker engine."""

from __future__ import annotations

import re

from tests.deploy.files import DESIGN_COMMANDS, ROOT, dockerfile, exec_form

SECRET_NAMES = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|BASIC_AUTH", re.IGNORECASE)


def _index(keyword: str, startswith: str = "", contains: str = "") -> int:
    for i, (kw, args) in enumerate(dockerfile()):
        if kw == keyword and args.startswith(startswith) and contains in args:
            return i
    raise AssertionError(f"no {keyword} {startswith}{contains}")


def test_slim_python_base() -> None:
    froms = [args for kw, args in dockerfile() if kw == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", froms[0])


def test_dependencies_are_their_own_layer() -> None:
    copy_requirements = _index("COPY", "requirements.txt ")
    install = _index("RUN", contains="pip install -r requirements.txt")
    copy_code = _index("COPY", "backend ")
    assert copy_requirements < install < copy_code


def test_runs_as_a_non_root_user() -> None:
    users = [args for kw, args in dockerfile() if kw == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    created = [args for kw, args in dockerfile() if kw == "RUN" and "useradd" in args]
    assert created and users[-1] in created[0]
    # The user switch comes after every step that needs root.
    assert _index("USER") > max(i for i, (kw, _) in enumerate(dockerfile()) if kw == "RUN")


def test_no_secret_is_baked_in() -> None:
    for keyword, args in dockerfile():
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not SECRET_NAMES.search(args), args
        if keyword in ("COPY", "ADD"):
            sources = args.split()[:-1]
            assert ".env" not in sources and "." not in sources, args
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".env.*" in ignored


def test_default_command_serves_the_api() -> None:
    cmd = exec_form(dockerfile()[-1][1])
    assert dockerfile()[-1][0] == "CMD"
    assert cmd == DESIGN_COMMANDS["api"].split()


def test_image_has_what_the_commands_need() -> None:
    copied = {args.split()[0] for kw, args in dockerfile() if kw == "COPY"}
    # alembic upgrade head (migrate) needs alembic.ini and the migrations beside the code.
    assert {"requirements.txt", "alembic.ini", "alembic", "backend"} <= copied


def test_pip_can_build_behind_a_proxy() -> None:
    # Build arguments for a private index and a proxy's CA, declared before the install.
    install = _index("RUN", contains="pip install -r requirements.txt")
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "EXTRA_CA_CERTS"):
        assert _index("ARG", name + "=") < install, name
    run = dockerfile()[install][1]
    assert "update-ca-certificates" in run
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt pip install" in run
