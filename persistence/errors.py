"""Errors raised by the store, each an :class:`~autotls.fsm.errors.AutoTLSError` like every
error autotls raises (the CLI and the facade turn them into one clear line).

Persistence sits below the engine and imports nothing of it but the error vocabulary in
:mod:`autotls.fsm.errors`, a leaf module every layer shares.
"""

from __future__ import annotations

from collections.abc import Collection

from autotls.fsm.errors import AutoTLSError, ErrorClass


class StoreError(AutoTLSError):
    """Something about the database prevents the store from working."""

    error_class = ErrorClass.LOCAL

    def __init__(self, message: str) -> None:
        super().__init__(message)


class DatabaseURLError(StoreError, ValueError):
    """The database URL is malformed or names an unsupported backend."""

    error_class = ErrorClass.PERMANENT


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer autotls than this one."""

    error_class = ErrorClass.PERMANENT


class SchemaOutdatedError(StoreError):
    """The database needs ``autotls db upgrade`` and automatic upgrade was turned off."""

    error_class = ErrorClass.PERMANENT


class ActiveOrderExistsError(StoreError):
    """The peer already has an active order (design rule 6)."""

    error_class = ErrorClass.PERMANENT

    def __init__(self, peer_id: str, order_id: int | None = None) -> None:
        where = f" (order {order_id})" if order_id is not None else ""
        super().__init__(f"peer {peer_id} already has an active order{where}")
        self.peer_id = peer_id
        self.order_id = order_id


class OrderNotFoundError(StoreError):
    error_class = ErrorClass.PERMANENT

    def __init__(self, order_id: int) -> None:
        super().__init__(f"no order with id {order_id}")
        self.order_id = order_id


class OrderBusyError(StoreError):
    """An operator action lost the race with a worker holding the order's lease: try again
    once the lease ends (the message says when)."""

    error_class = ErrorClass.TRANSIENT


class OrderStateError(StoreError):
    """An operator action asked for an order in a state the action does not apply to (e.g.
    ``renew --force`` of an order that is not Installed)."""

    error_class = ErrorClass.PERMANENT

    def __init__(self, order_id: int, state: str, allowed: Collection[str]) -> None:
        super().__init__(
            f"order {order_id} is {state}; this action needs one of " + ", ".join(sorted(allowed))
        )
        self.order_id = order_id
        self.state = state
        self.allowed = frozenset(allowed)


class CorruptRowError(StoreError):
    """A stored row cannot be decoded; the message names the row and the column."""

    error_class = ErrorClass.PERMANENT


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
