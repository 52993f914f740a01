"""README.md's deployment sections say what the code and the files do."""

from __future__ import annotations

import re

from tests.deploy.files import ROOT, command, compose, example_names, example_values

README = (ROOT / "README.md").read_text()


def _settings_rows() -> dict[str, str]:
    table = README.split("<!-- settings table", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \| ([^|]*) \|", table, flags=re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_settings_table_lists_every_setting_of_env_example() -> None:
    rows = _settings_rows()
    missing = [name for name in example_names() if name not in rows]
    assert not missing, "add to README.md's settings table: " + ", ".join(
        f"| `{name}` | `{example_values().get(name, '')}` | ... |" for name in missing
    )
    assert set(rows) - set(example_names()) == set(), "README lists settings that do not exist"
    assert list(rows) == example_names(), "keep the table in .env.example's order"


def test_settings_table_defaults_are_env_examples() -> None:
    rows = _settings_rows()
    for name, value in example_values().items():
        if value:
            assert rows[name] == f"`{value}`", name


def test_compose_commands_in_the_services_table_are_the_files() -> None:
    for name in ("api", "celery-beat", "celery-worker", "flower"):
        row = re.search(rf"^\| `{name}` \| `([^`]+)`", README, flags=re.MULTILINE)
        assert row, name
        assert row.group(1).split() == command(name)
    for name in compose()["services"]:
        assert re.search(rf"^\| [^|]*`{name}`", README, flags=re.MULTILINE), name


def test_the_metrics_named_exist() -> None:
    source = (ROOT / "backend" / "metrics.py").read_text()
    named = set(re.findall(r"`(mailbeat_[a-z_]+)", README))
    assert len(named) >= 7
    for metric in named:
        base = metric.removesuffix("_total")
        assert f'"{base}"' in source, metric


def test_the_routes_named_exist() -> None:
    from backend.main import create_app

    paths = set(create_app().openapi()["paths"])
    route = r"(/(?:accounts|admin|messages|health|metrics)[^`\s?'\"]*)"
    named = set(re.findall(route, README))
    assert len(named) >= 8
    for path in named:
        normalized = re.sub(r"/(?:\d+|N)(?=/|$)", "/{id}", path)
        candidates = {p for p in paths if re.sub(r"\{[^}]+\}", "{id}", p) == normalized}
        assert candidates, f"README names {path}, which the API does not have"


def test_the_troubleshooting_messages_are_mailbeats() -> None:
    """Every log line quoted in Troubleshooting is one the code can write (compose's and
    Redis's own messages aside)."""
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    source = "\n".join(path.read_text() for path in (ROOT / "backend").rglob("*.py"))
    quoted = re.findall(r"^\| [^|`]*`([^`]+)`", section, flags=re.MULTILINE)
    foreign = ("required variable", "OOM command not allowed")
    checked = [text for text in quoted if not text.startswith(foreign)]
    assert len(checked) >= 8
    for text in checked:
        # "..." and a lone N stand for what the message fills in.
        for fragment in (part.strip(" .:") for part in re.split(r"\.\.\.|\bN\b", text)):
            assert fragment in source, f"README quotes {text!r}; the code never says {fragment!r}"
