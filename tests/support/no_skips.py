"""A skipped or xfailed test fails the run: CI is green only when every test ran and
passed. Loaded by tests/conftest.py; a skip is a test that silently stopped checking."""

from __future__ import annotations

import pytest

_not_run: list[str] = []


def _note(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped:
        kind = "xfailed" if getattr(report, "wasxfail", None) is not None else "skipped"
        _not_run.append(f"{kind}: {report.nodeid}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A module skipped whole collects nothing: that is a failure here too.
    if _not_run and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _not_run:
        terminalreporter.write_line(
            "FAILED: no test may be skipped or xfailed (tests/support/no_skips.py):", red=True
        )
        for line in _not_run:
            terminalreporter.write_line(f"  {line}", red=True)
