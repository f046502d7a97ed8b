"""What the facade tells its embedder: the events of :meth:`autotls.AutoTLS.on` and their
payloads, the errors it raises when a certificate cannot come (every one an
:class:`~autotls.fsm.errors.AutoTLSError`), and the signal its waiters sleep on.

==============  =============================================  ==========================
event           when                                           payload
==============  =============================================  ==========================
``loaded``      the first valid certificate is served          :class:`CertificateInfo`
``renewed``     a newer certificate replaced it                :class:`CertificateInfo`
``failed``      the order failed permanently                   :class:`Failure`
``transition``  every commit of the order (moves and retries)  ``autotls.OrderEvent``
==============  =============================================  ==========================
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from autotls.fsm.errors import AutoTLSError, ErrorClass

if TYPE_CHECKING:
    from autotls.fsm.worker import OrderEvent
    from autotls.persistence.records import OrderSnapshot

log = logging.getLogger("autotls.service")

EventName = Literal["loaded", "renewed", "failed", "transition"]
EVENT_NAMES: frozenset[str] = frozenset(get_args(EventName))
Callback = Callable[[Any], Awaitable[None] | None]


@dataclass(frozen=True)
class CertificateInfo:
    peer_id: str
    domain: str  # *.<peer>.libp2p.direct
    serial: str
    not_before: datetime
    not_after: datetime
    chain_path: Path
    key_path: Path


@dataclass(frozen=True)
class Failure:
    """Why the order failed: the class of the error (``autotls.ErrorClass`` values), its
    message, and the server's problem document when there was one."""

    order_id: int
    error_class: str | None
    message: str | None
    problem: Mapping[str, Any] | None = None

    @classmethod
    def of_order(cls, order: OrderSnapshot) -> Failure:
        """The failure a failed order's row records."""
        return cls(order.id, order.last_error_class, order.last_error_message, order.last_problem)


CertificateCallback = Callable[[CertificateInfo], Awaitable[None] | None]
FailureCallback = Callable[[Failure], Awaitable[None] | None]
TransitionCallback = Callable[["OrderEvent"], Awaitable[None] | None]


class Subscribers:
    """The callbacks of each event; one failing callback is logged and never stops the rest."""

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callback]] = {}

    def add(self, event: str, callback: Callback) -> None:
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown event {event!r} (known: {', '.join(sorted(EVENT_NAMES))})")
        self._callbacks.setdefault(event, []).append(callback)

    async def emit(self, event: EventName, payload: object) -> None:
        for callback in self._callbacks.get(event, []):
            try:
                result = callback(payload)
                if result is not None:
                    await result
            except Exception:
                log.exception("AutoTLS %s callback failed", event)


class Signal:
    """Wakes every coroutine that asked for the next change before it happened.

    Take the future with :meth:`next` *before* reading the state it is about, then await it:
    a change between the read and the await is not lost (an ``asyncio.Event`` that one waiter
    clears can swallow another waiter's wake-up)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def next(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)


class NotStartedError(AutoTLSError, RuntimeError):
    """A call that needs a started :class:`AutoTLS` (``async with`` or :meth:`AutoTLS.start`)."""

    error_class = ErrorClass.PERMANENT


class IssuanceFailed(AutoTLSError):
    """The order failed permanently: ``error_class`` says which kind of error ended it,
    ``problem`` is the server's problem document (RFC 7807) when there was one, ``failure``
    the same as the ``failed`` event's payload. Fix the cause, then ``autotls retry``."""

    def __init__(self, failure: Failure) -> None:
        try:
            kind = ErrorClass(failure.error_class or ErrorClass.PERMANENT)
        except ValueError:  # e.g. a row failed before error classes were recorded
            kind = ErrorClass.PERMANENT
        super().__init__(
            f"order {failure.order_id} failed ({failure.error_class}): {failure.message}",
            error_class=kind,
            problem=failure.problem,
        )
        self.failure = failure


class DeadlineExceeded(AutoTLSError):
    """The order's next attempt would come after the caller's deadline (or the deadline
    passed). The order is persisted as it stands: the next run resumes it."""

    error_class = ErrorClass.TRANSIENT

    def __init__(self, order: OrderSnapshot, deadline: datetime) -> None:
        last = (
            f"; last error ({order.last_error_class}): {order.last_error_message}"
            if order.last_error_class
            else ""
        )
        super().__init__(
            f"order {order.id} is {order.state}; its next attempt at "
            f"{order.next_run_at.isoformat(timespec='seconds')} is after the deadline "
            f"{deadline.isoformat(timespec='seconds')}{last}"
        )
        self.order = order
        self.deadline = deadline
