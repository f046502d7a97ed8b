"""Shared test plumbing. Fixture modules live in tests/fixtures/ (one per real component) and are
loaded as plugins so each can be owned and changed on its own."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.components",
    "tests.fixtures.libp2p",
    "tests.fixtures.engine",
    "tests.fixtures.postgres",
    "tests.fixtures.pebble",
    "tests.fixtures.realstack",
    "tests.fixtures.browser",
]
