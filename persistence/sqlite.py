"""What SQLite needs to behave like the store expects, and nothing else.

* The database file holds account and certificate keys: it is created 0600 before SQLite
  creates it (and any directory it needs, 0700).
* Writers take the lock up front (``BEGIN IMMEDIATE``): a deferred transaction that reads then
  writes can hit ``SQLITE_BUSY`` without the busy handler ever being consulted. Readers use a
  deferred ``BEGIN`` (execution option :data:`READ_ONLY`), so they never take the write lock.
* WAL, a busy timeout, foreign keys on.
* :class:`StoreThread`: the store's transactions run on the standard library's driver in one
  thread of their own, each transaction a single hand-off from the event loop (no per-statement
  thread hops, no pre-ping: a file has no server to lose). One thread also means one writer
  per process: the process's own claims and commits queue in order instead of meeting in
  SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection

from autotls._files import make_private_dirs

SQLITE_BUSY_TIMEOUT_MS = 30_000
# An execution option that marks a connection as a reader.
READ_ONLY = "autotls_read_only"

T = TypeVar("T")


class StoreThread:
    """Runs a function on a connection, inside one transaction, in the store's own thread."""

    def __init__(self, url: URL) -> None:
        self.engine = create_engine(url.set(drivername="sqlite+pysqlite"), hide_parameters=True)
        configure(self.engine)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autotls-store")
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        call = functools.partial(self._transaction, fn, args, write)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _transaction(self, fn: Callable[..., T], args: tuple[Any, ...], write: bool) -> T:
        with self.engine.connect() as conn:
            if not write:
                conn = conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                return fn(conn, *args)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.dispose)
        self._executor.shutdown(wait=False)


def create_private_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (and any directory it needs, 0700)."""
    make_private_dirs(path.parent)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


def configure(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver so BEGIN IMMEDIATE is ours to emit.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
