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
