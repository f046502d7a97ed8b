"""Change notifications: what other processes committed, told to this one at once, so a
running worker takes an operator's ``renew --force``, ``retry`` or ``revoke`` within a
second, and a process without the order's lease serves the certificate another one just
installed -- instead of both noticing at their next poll (30 s by default).

A change is a journal entry -- every move an operator or a worker commits writes one, in the
same transaction as the move -- or a revocation an operator recorded on a certificate's row
without moving the order (``revoke --no-renew``). :class:`Change` says which order and peer it
concerns and who made it (a worker id, the operator's ``cli:user@host``; None for a
revocation), so a listener can ignore its own commits. The poll stays as the fallback; a
notification only cuts a sleep short.

* **PostgreSQL**: the store sends ``NOTIFY autotls_changes`` with the change as JSON inside
  the committing transaction (PostgreSQL delivers it only if that commits); the feed
  ``LISTEN``\\s on a dedicated autocommit connection (psycopg 3). When that connection drops,
  notifications may have been missed: the feed reports :data:`ANYTHING` and reconnects with
  backoff.
* **SQLite** has no server to notify through. The feed keeps one connection in a thread and
  reads ``PRAGMA data_version`` every :data:`SQLITE_POLL_S` seconds: the value moves when
  another connection commits to the file (any writer, even one that knows nothing of this
  feed), and then the journal entries (and revocations) added since are read and reported.
  Measured
  (``bench.operator``, bench/README.md): a check costs ~4 us, the watcher under 2 s of CPU
  per hour; a commit is seen 0-250 ms later (p50 127 ms). A socket in the data directory
  would be faster (0.06 ms) but only for writers that know of it, and needs a socket per
  process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

CHANNEL = "autotls_changes"
SQLITE_POLL_S = 0.25
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True)
class Change:
    """A committed move of ``order_id`` (of peer ``peer_id``) by ``actor``. All three are
    None for :data:`ANYTHING`: notifications may have been lost, re-read everything."""

    order_id: int | None
    peer_id: str | None
    actor: str | None

    def concerns(self, peers: frozenset[str] | None) -> bool:
        """Whether a listener serving ``peers`` (None: every peer) should look again."""
        return peers is None or self.peer_id is None or self.peer_id in peers


ANYTHING = Change(None, None, None)

Listener = Callable[[Sequence[Change]], None]


def notify_payload(order_id: int, peer_id: str, actor: str | None) -> str:
    """The JSON a PostgreSQL commit sends (well under NOTIFY's 8000-byte limit)."""
    return json.dumps({"order": order_id, "peer": peer_id, "by": actor}, separators=(",", ":"))


def parse_payload(text: str) -> Change:
    try:
        data = json.loads(text)
        return Change(int(data["order"]), str(data["peer"]), data.get("by"))
    except (ValueError, TypeError, KeyError):
        log.debug("unreadable change notification %r", text)
        return ANYTHING


class ChangeFeed:
    """Calls every subscribed listener, on the event loop, with the changes other
    connections commit. Started by the first :meth:`subscribe` (from a running loop), stopped
    by :meth:`close`. Listeners must be quick and must not raise."""

    def __init__(self, url: URL) -> None:
        self.url = url
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = threading.Event()
        self.listening = asyncio.Event()  # commits from now on are told (tests, benchmarks)
        self.delivered = 0  # batches handed to listeners (tests, benchmarks)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Start delivering to ``listener``; returns the function that stops it."""
        self._listeners.append(listener)
        if self._task is None:
            self._stopping.clear()
            backend = self.url.get_backend_name()
            runner = self._run_postgres() if backend == "postgresql" else self._run_sqlite()
            self._task = asyncio.get_running_loop().create_task(runner, name="autotls-changes")

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def close(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _deliver(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        self.delivered += 1
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:
                log.exception("change listener failed")

    # -- PostgreSQL -----------------------------------------------------------------------

    async def _run_postgres(self) -> None:
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        shown = self.url.render_as_string(hide_password=True)
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if failures:
                        log.info("change notifications from %s resumed", shown)
                        self._deliver([ANYTHING])  # what was committed while we were away
                    failures = 0
                    await self._listen(conn)
            except psycopg.Error as exc:
                failures += 1
                delay = min(RECONNECT_MAX_S, 2.0 ** (failures - 1))
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "change notifications from %s interrupted (%s); polling until they "
                    "resume, next try in %.0fs",
                    shown,
                    " ".join(str(exc).split())[:200],
                    delay,
                )
                self._deliver([ANYTHING])
                await asyncio.sleep(delay)

    async def _listen(self, conn: Any) -> None:
        """Deliver ``conn``'s notifications as they arrive; raises when the connection is
        lost. Waits on the socket itself: psycopg's ``notifies()`` wakes every 100 ms to check
        for interrupts, ten wake-ups a second of an idle process (``bench/idle.py``)."""
        import psycopg

        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = conn.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                conn.pgconn.consume_input()  # raises OperationalError when the server is gone
                changes = []
                while (notify := conn.pgconn.notifies()) is not None:
                    changes.append(parse_payload(notify.extra.decode()))
                if conn.pgconn.status != psycopg.pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the connection was closed")
                self._deliver(changes)
        finally:
            loop.remove_reader(fd)

    # -- SQLite ---------------------------------------------------------------------------

    async def _run_sqlite(self) -> None:
        loop = asyncio.get_running_loop()
        path = Path(str(self.url.database))
        thread = threading.Thread(
            target=self._poll_sqlite,
            args=(path, loop),
            name="autotls-changes-sqlite",
            daemon=True,  # never keeps the interpreter alive; close() stops it
        )
        thread.start()
        try:
            await asyncio.Event().wait()  # until cancelled by close()
        finally:
            self._stopping.set()
            await asyncio.to_thread(thread.join)

    def _poll_sqlite(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        """The poll loop, in its own thread with its own connection (``data_version`` is per
        connection: it tells about the *other* connections' commits)."""
        conn: sqlite3.Connection | None = None
        version: int | None = None
        last_id = 0
        last_revoked: str | None = None
        trouble: str | None = None
        while not self._stopping.wait(0 if conn is None else SQLITE_POLL_S):
            try:
                if conn is None:
                    conn = _open_sqlite(path)
                    version = _data_version(conn)
                    last_id = _last_journal_id(conn)
                    last_revoked = _last_revocation(conn)
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        loop.call_soon_threadsafe(self.listening.set)
                    if trouble is not None:
                        loop.call_soon_threadsafe(self._deliver, [ANYTHING])
                current = _data_version(conn)
                if current == version:
                    trouble = None
                    continue
                version = current
                changes, last_id = _journal_since(conn, last_id)
                revoked, last_revoked = _revocations_since(conn, last_revoked)
                changes += revoked
                trouble = None
            except sqlite3.Error as exc:
                if str(exc) != trouble:
                    log.debug("reading changes from %s: %s", path, exc)
                trouble = str(exc)
                if conn is not None:
                    conn.close()
                    conn = None
                if self._stopping.wait(1.0):
                    break
                continue
            if changes:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                    loop.call_soon_threadsafe(self._deliver, changes)
        if conn is not None:
            conn.close()


def _open_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
    conn.execute("PRAGMA query_only=ON")  # this connection only ever reads
    return conn


def _data_version(conn: sqlite3.Connection) -> int:
    row: Any = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])


def _last_journal_id(conn: sqlite3.Connection) -> int:
    row: Any = conn.execute("SELECT coalesce(max(id), 0) FROM journal").fetchone()
    return int(row[0])


def _last_revocation(conn: sqlite3.Connection) -> str | None:
    row: Any = conn.execute("SELECT max(revoked_at) FROM certificates").fetchone()
    return None if row[0] is None else str(row[0])


def _revocations_since(
    conn: sqlite3.Connection, last: str | None
) -> tuple[list[Change], str | None]:
    """Revocations recorded after ``last`` (SQLite keeps the moments as ISO text, which
    sorts as the moments do)."""
    rows = conn.execute(
        "SELECT order_id, peer_id, revoked_at FROM certificates "
        "WHERE revoked_at IS NOT NULL AND (? IS NULL OR revoked_at > ?) ORDER BY revoked_at",
        (last, last),
    ).fetchall()
    changes = [Change(int(r[0]), str(r[1]), None) for r in rows]
    return changes, (str(rows[-1][2]) if rows else last)


def _journal_since(conn: sqlite3.Connection, last_id: int) -> tuple[list[Change], int]:
    rows = conn.execute(
        "SELECT j.id, j.order_id, o.peer_id, j.worker FROM journal AS j "
        "JOIN orders AS o ON o.id = j.order_id WHERE j.id > ? ORDER BY j.id",
        (last_id,),
    ).fetchall()
    changes = [Change(int(r[1]), str(r[2]), r[3]) for r in rows]
    return changes, (int(rows[-1][0]) if rows else last_id)
