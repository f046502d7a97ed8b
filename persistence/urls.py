"""Database URLs: what users type and what the drivers need.

Users give ``sqlite:///path``, a bare file path, or ``postgresql://...`` (``postgres://``
too). The store runs async (``sqlite+aiosqlite``, ``postgresql+psycopg``); Alembic runs sync
on the same database (``sqlite``, ``postgresql+psycopg``).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from autotls.persistence.errors import DatabaseURLError

# The SQLite file in a data directory when no URL is given (the facade's and the CLI's default).
DATABASE_FILE = "autotls.db"

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg"}
_SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg"}


def parse_database_url(text: str) -> URL:
    """Parse and validate a user-supplied URL (or SQLite file path) into a backend URL."""
    text = text.strip()
    if not text:
        raise DatabaseURLError("empty database URL")
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser()))
    if text.startswith("postgres://"):
        text = "postgresql://" + text[len("postgres://") :]
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise DatabaseURLError(f"malformed database URL {redact(text)!r}: {exc}") from None
    backend = url.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise DatabaseURLError(
            f"unsupported database {backend!r} in {redact(text)!r}: use sqlite:///FILE or postgresql://"
        )
    if backend == "sqlite" and url.database in (None, "", ":memory:"):
        raise DatabaseURLError(
            "an in-memory SQLite database cannot hold orders across restarts; give a file path"
        )
    return url


def async_url(url: URL) -> URL:
    return url.set(drivername=_ASYNC_DRIVERS[url.get_backend_name()])


def sync_url(url: URL) -> URL:
    return url.set(drivername=_SYNC_DRIVERS[url.get_backend_name()])


def redact(url: URL | str) -> str:
    """The URL without its password, for messages and logs."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return "<unparseable URL>"
    return url.render_as_string(hide_password=True)
