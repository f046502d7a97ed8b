"""Error classes shared by the engine and every adapter (design.md rule 8).

Every failure that crosses a port is an :class:`AutoTLSError` carrying an
:class:`ErrorClass`; the worker turns the class into the next move without
knowing which protocol raised it:

* ``transient``     network blip, 5xx, timeout, badNonce -> retry with jittered backoff
* ``rate_limited``  429 / rateLimited / broker down -> wait for Retry-After (it always wins)
* ``order_invalid`` the CA judged this order invalid -> count against the validation
                    budget and re-order from Registered
* ``permanent``     bad configuration, unauthorized, deactivated account -> Failed

A network blip must never make an order terminal, so the default for unknown
trouble is *transient*; adapters opt into *permanent* deliberately.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class ErrorClass(enum.StrEnum):
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    ORDER_INVALID = "order_invalid"
    PERMANENT = "permanent"


class AutoTLSError(Exception):
    """Base of every classified failure.

    ``retry_after`` is in seconds from the moment the error was raised (a server's
    Retry-After, already converted from an HTTP date by the adapter); ``problem`` is the
    server's problem document (RFC 7807) when there was one, kept verbatim for the
    journal and the operator. Neither may contain secrets.
    """

    error_class: ErrorClass = ErrorClass.TRANSIENT

    def __init__(
        self,
        message: str,
        *,
        error_class: ErrorClass | None = None,
        retry_after: float | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if error_class is not None:
            self.error_class = error_class
        self.retry_after = retry_after
        self.problem: dict[str, Any] | None = dict(problem) if problem is not None else None

    def __str__(self) -> str:
        return self.message


class TransientError(AutoTLSError):
    error_class = ErrorClass.TRANSIENT


class RateLimitedError(AutoTLSError):
    error_class = ErrorClass.RATE_LIMITED


class OrderInvalidError(AutoTLSError):
    error_class = ErrorClass.ORDER_INVALID


class PermanentError(AutoTLSError):
    error_class = ErrorClass.PERMANENT


class ConfigurationError(PermanentError):
    """The operator's input is wrong (malformed key, URL, address...): nothing to retry."""
