"""Errors raised by the store. Persistence sits below the engine and must not import it, so
these are plain exceptions; the CLI and the facade turn them into one clear line."""

from __future__ import annotations


class StoreError(Exception):
    """Something about the database prevents the store from working."""


class DatabaseURLError(StoreError):
    """The database URL is malformed or names an unsupported backend."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer autotls than this one."""


class SchemaOutdatedError(StoreError):
    """The database needs ``autotls db upgrade`` and automatic upgrade was turned off."""


class ActiveOrderExistsError(StoreError):
    """The peer already has an active order (design rule 6)."""

    def __init__(self, peer_id: str, order_id: int | None = None) -> None:
        where = f" (order {order_id})" if order_id is not None else ""
        super().__init__(f"peer {peer_id} already has an active order{where}")
        self.peer_id = peer_id
        self.order_id = order_id


class OrderNotFoundError(StoreError):
    def __init__(self, order_id: int) -> None:
        super().__init__(f"no order with id {order_id}")
        self.order_id = order_id


class OrderBusyError(StoreError):
    """An operator action lost the race with a worker holding the order's lease."""


class CorruptRowError(StoreError):
    """A stored row cannot be decoded; the message names the row and the column."""


class StoreUnavailableError(StoreError):
    """The database keeps refusing the store's work (read-only, full, unreachable...): the
    message is one line naming the database and the reason. Raised by a worker after a
    bounded number of consecutive failures, so a process that cannot make progress ends."""


def describe_database_error(exc: BaseException) -> str:
    """One line for a database failure, without SQL or parameters: the driver's own reason
    (``attempt to write a readonly database``), else the exception's first line."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc) or type(exc).__name__
    line = " ".join(text.split("\n", 1)[0].split())
    return line[:300] + ("..." if len(line) > 300 else "")
