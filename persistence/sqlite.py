"""What SQLite needs to behave like the store expects, and nothing else.

* The database file holds account and certificate keys: it is created 0600 before SQLite
  creates it (and any directory it needs, 0700).
* Writers take the lock up front (``BEGIN IMMEDIATE``): a deferred transaction that reads then
  writes can hit ``SQLITE_BUSY`` without the busy handler ever being consulted. Readers use a
  deferred ``BEGIN`` (:class:`ReadConnection`), so they never take the write lock.
* WAL, a busy timeout, foreign keys on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from autotls._files import make_private_dirs

SQLITE_BUSY_TIMEOUT_MS = 30_000
# An execution option that marks a connection as a reader (see ReadConnection).
READ_ONLY = "autotls_read_only"


class ReadConnection:
    """A connection for reads: on SQLite a deferred BEGIN, so readers never take the write lock."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncConnection:
        conn = await self._engine.connect()
        self._conn = await conn.execution_options(**{READ_ONLY: True})
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        await self._conn.rollback()
        await self._conn.close()


def create_private_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (and any directory it needs, 0700)."""
    make_private_dirs(path.parent)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def configure(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
