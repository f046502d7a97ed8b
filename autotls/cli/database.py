"""The database as the operator commands see it: opened as it is (never created, never
upgraded behind the operator's back), the order a command acts on, and who acted."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotls.cli.exits import DatabaseProblem, UsageError, sqlalchemy_reason

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from autotls.persistence.store import Store


def require_existing(url_text: str) -> None:
    """Operator commands never create a database: a missing SQLite file is an error."""
    from autotls.persistence.urls import parse_database_url

    url = parse_database_url(url_text)
    if url.get_backend_name() != "sqlite":
        return
    path = Path(str(url.database))
    if not path.is_file():
        raise DatabaseProblem(
            f"no database at {path} (nothing has run with this --data-dir/--db yet; "
            "`autotls run` creates it)"
        )


def database_exists(url: URL) -> bool:
    return url.get_backend_name() != "sqlite" or Path(str(url.database)).is_file()


@contextlib.asynccontextmanager
async def opened_store(url_text: str, *, upgrade: bool = False) -> AsyncIterator[Store]:
    """The store, opened without creating or upgrading anything unless asked to."""
    from sqlalchemy.exc import SQLAlchemyError

    from autotls.persistence.store import Store
    from autotls.persistence.urls import redact

    if not upgrade:
        require_existing(url_text)
    try:
        store = await Store.open(url_text, upgrade=upgrade)
    except SQLAlchemyError as exc:
        raise DatabaseProblem(
            f"database {redact(url_text)} is unusable: {sqlalchemy_reason(exc)}"
        ) from None
    try:
        yield store
    finally:
        await store.close()


def schema_call(function: Callable[[URL], Any], url: URL, shown: str) -> Any:
    """``function(url)`` (a :mod:`autotls.persistence.schema` call), with SQLAlchemy's errors
    as one line that names the database."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return function(url)
    except SQLAlchemyError as exc:
        raise DatabaseProblem(f"database {shown} is unusable: {sqlalchemy_reason(exc)}") from None


async def pick_order(store: Store, order_id: int | None, what: str) -> int:
    """``order_id``, or the only active order; anything else needs ``--order``."""
    from autotls.persistence.models import INACTIVE_STATES
    from autotls.persistence.store import CorruptOrder

    if order_id is not None:
        return order_id
    rows = await store.list_orders()
    active = [r for r in rows if not isinstance(r, CorruptOrder) and r.state not in INACTIVE_STATES]
    if len(active) == 1:
        return active[0].id
    if not active:
        raise UsageError(f"no active order to {what}: give --order ID (see `autotls status`)")
    ids = ", ".join(str(r.id) for r in active)
    raise UsageError(f"{len(active)} active orders ({ids}): choose one with --order ID")


def actor() -> str:
    """Who made an operator move, for the journal: ``cli:user@host``."""
    import getpass
    import os
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"
