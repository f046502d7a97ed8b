"""Schema versions, owned by Alembic (``migrations/``).

The program upgrades an older database on start, and refuses, naming both revisions, a
database whose revision it does not know (it was migrated by a newer autotls). Alembic runs
synchronously; callers in async code run these functions in a thread.

Alembic (a tenth of a second of imports and three revisions to run) is loaded only to
upgrade a database that has an older revision. A database already current is one plain
``SELECT`` of ``alembic_version`` against :data:`HEAD_REVISION`, so ``autotls status``
starts quickly; an empty one is created at the head from the tables in
:mod:`~autotls.persistence.models` and stamped, in one transaction (tests/test_migrations.py
checks it comes out the same as Alembic's build).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect, pool, text
from sqlalchemy.engine import URL, Connection

from autotls._files import make_private_dirs
from autotls.persistence.errors import SchemaOutdatedError, SchemaTooNewError
from autotls.persistence.urls import redact, sync_url

if TYPE_CHECKING:
    from alembic.config import Config

# The newest revision in migrations/versions, known without loading Alembic, compared with
# what the database's alembic_version table holds (migrations/env.py keeps Alembic's default
# table name). tests/test_migrations.py fails when this differs from Alembic's own head, so a
# new revision cannot forget it.
HEAD_REVISION = "0003"

# The Alembic scripts travel with the package (autotls/migrations in the wheel; in a source
# checkout the top-level migrations/ folder, which autotls/migrations links to). Located by
# path, never by importing a top-level `migrations` that an embedder may also have.
MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"


def alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The head as Alembic computes it from migrations/versions (see :data:`HEAD_REVISION`)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "migrations/ has no revisions"
    return head


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _engine(url: URL):  # type: ignore[no-untyped-def]
    return create_engine(sync_url(url), poolclass=pool.NullPool, hide_parameters=True)


def current_revision(url: URL) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _stored_revision(conn: Connection) -> str | None:
    """The revision in Alembic's version table, read with a plain query: None when the table
    is missing, empty, or holds several rows (branches, which only Alembic can resolve)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    return str(rows[0][0]) if len(rows) == 1 else None


def check(url: URL) -> SchemaStatus:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            if _stored_revision(conn) == HEAD_REVISION:
                return SchemaStatus(HEAD_REVISION, HEAD_REVISION)
            if _empty(conn):
                return SchemaStatus(None, HEAD_REVISION)
            # Not at our head: Alembic tells an older revision (to upgrade) from one it does
            # not know (a newer autotls migrated this database).
            from alembic.runtime.migration import MigrationContext

            current = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    status = SchemaStatus(current, head_revision())
    if status.current is not None and status.current not in known_revisions():
        raise SchemaTooNewError(
            f"database {redact(url)} is at schema revision {status.current}, which this autotls "
            f"does not know (newest known: {status.head}); it was migrated by a newer autotls. "
            "Upgrade autotls, or point --db at another database."
        )
    return status


# Alembic's ``context`` is one per process: two upgrades at once in one process corrupt each
# other. Across processes (a fleet starting on a fresh database), the database-level lock in
# _migration_lock serialises them; the loser then finds the schema already at head.
_PROCESS_LOCK = threading.Lock()
# pg_advisory_xact_lock key: "autotls" in ASCII, a constant only this program uses.
_PG_LOCK_KEY = 0x6175746F746C73


@contextlib.contextmanager
def _migration_lock(url: URL) -> Iterator[None]:
    with _PROCESS_LOCK:
        if url.get_backend_name() != "sqlite":
            yield  # PostgreSQL: the advisory lock is taken inside the transaction
            return
        lock_path = Path(f"{url.database}.migrate-lock")
        make_private_dirs(lock_path.parent)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _empty(conn: Connection) -> bool:
    """No table at all: nothing to migrate, and nothing Alembic needs to look at."""
    return not inspect(conn).get_table_names()


# Alembic's own version table, as its DDL creates it (migrations/env.py keeps the defaults).
_VERSION_TABLE_DDL = (
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
    "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
)


def _create_at_head(conn: Connection) -> None:
    from sqlalchemy import MetaData
    from sqlalchemy.schema import CreateIndex, CreateTable

    from autotls.persistence.models import metadata, with_postgresql_options

    if conn.dialect.name == "postgresql":
        with_postgresql_options()
    # DDL on a copy: emitting the orders <-> certificates key as an ALTER marks the constraint
    # "never inline" for good, which would then drop it from a later SQLite CREATE TABLE.
    tables = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(tables)
    if conn.dialect.name == "postgresql":
        tables.create_all(conn)  # the cycle: one ALTER TABLE ... ADD CONSTRAINT
    else:
        # SQLite has no ALTER ... ADD CONSTRAINT, so create_all would leave that key out;
        # revision 0002 built it into the table, as here.
        for table in tables.sorted_tables:
            fks = list(table.foreign_key_constraints)
            conn.execute(CreateTable(table, include_foreign_key_constraints=fks))
            for index in table.indexes:
                conn.execute(CreateIndex(index))
    conn.execute(text(_VERSION_TABLE_DDL))
    conn.execute(
        text("INSERT INTO alembic_version (version_num) VALUES (:rev)"), {"rev": HEAD_REVISION}
    )


def upgrade(url: URL, revision: str = "head") -> SchemaStatus:
    """Bring the schema to ``revision``; refuses a database newer than we know. Safe when
    several threads or processes upgrade the same database at once."""
    with _migration_lock(url):
        check(url)
        engine = _engine(url)
        try:
            with engine.begin() as conn:
                if url.get_backend_name() == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                if revision in ("head", HEAD_REVISION) and _empty(conn):
                    _create_at_head(conn)
                    return SchemaStatus(HEAD_REVISION, HEAD_REVISION)
                from alembic import command

                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        finally:
            engine.dispose()
        return check(url)


def ensure_current(url: URL, *, upgrade_allowed: bool) -> SchemaStatus:
    status = check(url)
    if status.up_to_date:
        return status
    if not upgrade_allowed:
        raise SchemaOutdatedError(
            f"database {redact(url)} is at schema revision {status.current or 'none'}, "
            f"this autotls needs {status.head}: run `autotls db upgrade`"
        )
    return upgrade(url)
