"""Alembic owns the schema: models and migrations agree, upgrades work from nothing and from
the previous revision, and a database from a newer autotls is refused with a clear message."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, pool, text

from autotls.persistence import schema
from autotls.persistence.errors import SchemaOutdatedError, SchemaTooNewError
from autotls.persistence.models import metadata
from autotls.persistence.store import Store
from autotls.persistence.urls import parse_database_url, sync_url


def _sync_engine(url: str):  # type: ignore[no-untyped-def]
    return create_engine(sync_url(parse_database_url(url)), poolclass=pool.NullPool)


def test_models_and_migrations_agree(database_url: str) -> None:
    url = parse_database_url(database_url)
    schema.upgrade(url)
    engine = _sync_engine(database_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diffs == []


def _plain(value: Any) -> str:
    """A reflected item as text, SQL expressions (a partial index's predicate) by their SQL."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_plain(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(_plain, value)) + "]"
    return repr(value) if isinstance(value, str | int | float | bool | None) else str(value)


def _schema_of(url: str) -> dict[str, Any]:
    """Everything the inspector reports about our tables, Alembic's version included."""
    engine = _sync_engine(url)
    try:
        with engine.connect() as conn:
            seen = inspect(conn)
            tables = sorted(seen.get_table_names())
            return {
                name: {
                    "columns": [
                        (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in seen.get_columns(name)
                    ],
                    "pk": seen.get_pk_constraint(name),
                    "fks": sorted(map(_plain, seen.get_foreign_keys(name))),
                    "indexes": sorted(map(_plain, seen.get_indexes(name))),
                    "unique": sorted(map(_plain, seen.get_unique_constraints(name))),
                    "rows": conn.execute(text("SELECT version_num FROM alembic_version")).all()
                    if name == "alembic_version"
                    else None,
                }
                for name in tables
            }
    finally:
        engine.dispose()


def _drop_everything(url: str) -> None:
    engine = _sync_engine(url)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        else:
            conn.execute(text("PRAGMA foreign_keys=OFF"))
            for name in inspect(conn).get_table_names():
                conn.execute(text(f'DROP TABLE "{name}"'))
    engine.dispose()


def test_an_empty_database_is_created_at_head_as_alembic_would_build_it(
    database_url: str,
) -> None:
    """schema.upgrade creates an empty database from the models and stamps it (no Alembic
    run): the result is the same schema, the same version row, and Alembic agrees it is at
    head (an upgrade after it changes nothing)."""
    from alembic import command

    url = parse_database_url(database_url)
    command.upgrade(_alembic_on(database_url), "head")  # Alembic's own build, all revisions
    built_by_alembic = _schema_of(database_url)
    _drop_everything(database_url)
    assert _schema_of(database_url) == {}

    assert schema.upgrade(url).up_to_date  # the empty database: created at head
    created_at_head = _schema_of(database_url)
    for table, facts in built_by_alembic.items():
        for fact, value in facts.items():
            assert created_at_head[table][fact] == value, (table, fact)
    assert created_at_head == built_by_alembic
    assert schema.current_revision(url) == schema.head_revision()
    engine = _sync_engine(database_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()
    command.upgrade(_alembic_on(database_url), "head")
    assert _schema_of(database_url) == built_by_alembic


def _alembic_on(url: str):  # type: ignore[no-untyped-def]
    cfg = schema.alembic_config()
    cfg.set_main_option("sqlalchemy.url", sync_url(parse_database_url(url)).render_as_string(False))
    return cfg


def test_the_partial_indexes_keep_their_predicate_on_postgresql() -> None:
    """The PostgreSQL predicate is attached when PostgreSQL is used (the store's open, the
    migrations' env), not at import: the DDL it gives is still the partial index."""
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.schema import CreateIndex

    from autotls.persistence.models import orders, with_postgresql_options

    with_postgresql_options()
    for index in orders.indexes:
        if index.name in ("uq_orders_active_peer", "ix_orders_due"):
            for dialect in (postgresql.dialect(), sqlite.dialect()):
                ddl = str(CreateIndex(index).compile(dialect=dialect))
                assert ddl.endswith("WHERE state NOT IN ('Failed')"), ddl


def test_the_head_revision_constant_is_alembics_head() -> None:
    """The schema check compares a database with HEAD_REVISION without loading Alembic: a
    new revision in migrations/versions must move the constant along, or this fails."""
    assert schema.head_revision() == schema.HEAD_REVISION
    assert schema.HEAD_REVISION in schema.known_revisions()


def test_upgrade_from_the_previous_revision_keeps_rows(database_url: str) -> None:
    url = parse_database_url(database_url)
    previous = "0001"
    schema.upgrade(url, previous)
    engine = _sync_engine(database_url)
    now = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO orders (peer_id, identifier, state, data, fence, seq, next_run_at,"
                " attempts, created_at, updated_at) VALUES ('k51x', '*.k51x.libp2p.direct',"
                " 'Registered', '{\"a\": 1}', 3, 2, :now, 0, :now, :now)"
            ),
            {"now": now},
        )
    engine.dispose()
    status = schema.upgrade(url)
    assert status.up_to_date and status.current == schema.head_revision()
    engine = _sync_engine(database_url)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT state, data, fence, current_certificate_id FROM orders")
        ).one()
    engine.dispose()
    assert tuple(row) == ("Registered", '{"a": 1}', 3, None)


async def test_store_upgrades_an_older_database_on_open(database_url: str) -> None:
    schema.upgrade(parse_database_url(database_url), "0001")
    store = await Store.open(database_url)
    await store.close()
    assert schema.check(parse_database_url(database_url)).up_to_date


async def test_store_refuses_a_newer_schema(database_url: str) -> None:
    url = parse_database_url(database_url)
    schema.upgrade(url)
    engine = _sync_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNewError, match=r"9999_future.*newer autotls"):
        await Store.open(database_url)


async def test_store_without_upgrade_names_the_command(database_url: str) -> None:
    schema.upgrade(parse_database_url(database_url), "0001")
    with pytest.raises(SchemaOutdatedError, match="autotls db upgrade"):
        await Store.open(database_url, upgrade=False)


def test_database_url_errors_are_clear() -> None:
    from autotls.persistence.errors import DatabaseURLError

    with pytest.raises(DatabaseURLError, match="unsupported database 'mysql'"):
        parse_database_url("mysql://root@localhost/x")
    with pytest.raises(DatabaseURLError, match="in-memory"):
        parse_database_url("sqlite://")
    with pytest.raises(DatabaseURLError, match="empty"):
        parse_database_url("  ")
    assert parse_database_url("postgres://u:secret@h/db").get_backend_name() == "postgresql"
    assert parse_database_url("/tmp/x.db").database == "/tmp/x.db"


def test_concurrent_upgrades_in_one_process(database_url: str) -> None:
    """Alembic's context is per process: upgrades from several threads must not interleave."""
    from concurrent.futures import ThreadPoolExecutor

    url = parse_database_url(database_url)
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: schema.upgrade(url), range(4)))
    assert all(s.up_to_date for s in statuses)


def test_concurrent_upgrades_from_separate_processes(database_url: str) -> None:
    """A fleet starting at once on a fresh database: one process migrates, the rest find the
    schema at head (PostgreSQL advisory lock; a lock file beside a SQLite database)."""
    import subprocess
    import sys
    from pathlib import Path

    program = (
        "import sys; from persistence import schema; from autotls.persistence.urls import "
        "parse_database_url; print(schema.upgrade(parse_database_url(sys.argv[1])).current)"
    )
    root = Path(__file__).resolve().parent.parent
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", program, database_url],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {schema.head_revision()}


# What revision 0002's code wrote into an order's data, besides what each state requires.
_LEGACY_DATA = {
    "serial": "0a1b",
    "not_after": "2026-03-01T00:00:00+00:00",
    "renewal_reason": "backstop",
    "replaces_dropped": "alreadyReplaced",
    "finalize_url": "https://ca.test/finalize/1",
    "token": "tok",
    "csr_sha256": "00",
    "broker_addresses": ["/ip4/1.2.3.4/tcp/4001"],
    "txt_servers": {"ns1": "ok"},
    "txt_last_check": {"ns1": "missing"},
    "unexpected_errors": 2,
}


async def test_upgrade_from_0002_keeps_orders_in_every_state(database_url: str) -> None:
    """A database written by revision 0002 with one order in every state (and one whose data
    is not JSON) comes out with each order's data as autotls.fsm.data declares it, the
    revocation on the certificate's row, and the journal's retries as the declared move."""
    from autotls.fsm.data import ALL_KEYS
    from autotls.fsm.machine import State, Trigger, requirements

    url = parse_database_url(database_url)
    schema.upgrade(url, "0002")
    engine = _sync_engine(database_url)
    now = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    ids: dict[str, int] = {}
    with engine.begin() as conn:
        for n, state in enumerate([*State, "corrupt"]):
            name = state.value if isinstance(state, State) else state
            data: dict[str, object] = {"waiting_for": "something", **_LEGACY_DATA}
            if isinstance(state, State):
                data.update({key: "x" for key in requirements(state)})
            if state is State.RENEW_DUE:
                data["revoked_serial"] = "0a1b"
            text_data = json.dumps(data) if name != "corrupt" else '{"half": '
            row_state = State.FAILED.value if name == "corrupt" else name
            ids[name] = conn.execute(
                text(
                    "INSERT INTO orders (peer_id, identifier, state, data, fence, seq,"
                    " next_run_at, attempts, created_at, updated_at) VALUES (:peer,"
                    " '*.p.libp2p.direct', :state, :data, 2, 2, :now, 0, :now, :now)"
                    " RETURNING id"
                ),
                {"peer": f"k51peer{n}", "state": row_state, "data": text_data, "now": now},
            ).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO journal (order_id, seq, kind, from_state, to_state, trigger, at,"
                    " worker, fence, detail) VALUES (:id, 1, 'operator', NULL, 'New', 'create',"
                    " :now, 'op', 0, '{}'), (:id, 2, 'error', 'New', 'New', 'retry:transient',"
                    " :now, 'w', 1, '{\"error_class\": \"transient\"}')"
                ),
                {"id": ids[name], "now": now},
            )
        for serial in ("0a1b", "0c2d"):
            conn.execute(
                text(
                    "INSERT INTO certificates (order_id, peer_id, chain_pem, key_pem, serial,"
                    " not_before, not_after, issued_at) VALUES (:id, 'k51peer8', 'PEM', 'KEY',"
                    " :serial, :now, :now, :now)"
                ),
                {"id": ids[State.RENEW_DUE.value], "serial": serial, "now": now},
            )
    engine.dispose()

    assert schema.upgrade(url).current == "0003"

    engine = _sync_engine(database_url)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(text("SELECT id, state, data FROM orders"))}
        revoked = dict(
            conn.execute(text("SELECT serial, revoked_at IS NOT NULL FROM certificates")).all()
        )
        triggers = [r[0] for r in conn.execute(text("SELECT trigger FROM journal ORDER BY id"))]
    engine.dispose()
    assert rows[ids["corrupt"]].data == '{"half": ', "a row that is not JSON is left as it was"
    for state in State:
        data = json.loads(rows[ids[state.value]].data)
        assert set(data) <= ALL_KEYS, state
        assert {k: data[k] for k in requirements(state)} == {k: "x" for k in requirements(state)}
        assert data["waiting_for"] == "something"
    assert revoked == {"0a1b": True, "0c2d": False}
    assert set(triggers) == {Trigger.CREATE.value, Trigger.RETRY_LATER.value}

    store = await Store.open(database_url)
    try:
        listed = {o.id: o for o in await store.list_orders()}
        assert {o.state for i, o in listed.items() if i != ids["corrupt"]} == {
            s.value for s in State
        }
        certs = await store.certificates(order_id=ids[State.RENEW_DUE.value])
        assert [c.revoked_at is not None for c in certs] == [True, False]
    finally:
        await store.close()
