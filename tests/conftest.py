"""Shared test plumbing. Fixture modules live in tests/fixtures/ (one per real component) and are
loaded as plugins so each can be owned and changed on its own.

The failure-injection suite (tests/test_fault_injection.py, marker ``faultinjection``) prints
its fault x step table at the end of the session, so that CI output shows it."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.components",
    "tests.fixtures.libp2p",
    "tests.fixtures.engine",
    "tests.fixtures.postgres",
    "tests.fixtures.pebble",
    "tests.fixtures.realstack",
    "tests.fixtures.browser",
    "tests.fixtures.faultstack",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faultinjection: the failure-injection suite (fault proxies in front of real Pebble, "
        "the local broker and challtestsrv)",
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.fixtures.faultstack import RESULTS, render_table

    if not RESULTS:
        return
    terminalreporter.write_sep("=", "failure injection: fault x step")
    for line in render_table(RESULTS):
        terminalreporter.write_line(line)
