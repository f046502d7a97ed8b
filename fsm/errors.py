"""Error classes shared by the engine and every adapter (design.md rule 8).

Every failure that crosses a port is an :class:`AutoTLSError` carrying an
:class:`ErrorClass`; the worker turns the class into the next move without knowing which
protocol raised it. The whole table (what :mod:`autotls.fsm.policy` does with each):

* ``transient``      network trouble, timeouts, 5xx, badNonce, an answer that breaks the
                     protocol (HTML where JSON was due, a redirect...) -> the order stays;
                     jittered exponential backoff, or Retry-After
* ``rate_limited``   429 / rateLimited, the broker is down -> stays; waits for Retry-After
* ``order_invalid``  the CA judged this order invalid -> counts against the validation budget
                     and re-orders from Registered
* ``permanent``      unauthorized, a deactivated account, the CA refuses what we asked for
                     -> Failed, with the problem document
* ``configuration``  a setting the operator can fix stands between the order and a
                     certificate the CA already issued (the chain does not build to the
                     configured trust roots) -> stays, never Failed, never re-ordered; tried
                     again on Let's Encrypt's schedule, at every worker start and on ``retry``
* ``local``          our own disk refused a write (EACCES, EROFS, ENOSPC...), the message
                     names the path -> stays; backoff as for transient
* ``internal``       a bug in autotls: any exception that is not an :class:`AutoTLSError`
                     -> stays; Let's Encrypt's schedule (1 min, 10 min, 100 min, then
                     daily); never Failed by itself

A network blip must never make an order terminal, so the default for unknown trouble is
*transient*; adapters opt into *permanent* deliberately.

The engine branches on these types only, never on a protocol's strings: where a step needs
more than the class, the adapter raises a typed port error (:class:`AccountUnknownError`,
:class:`ReplacesRefusedError`, :class:`CertificateUnusableError`), so the fakes and the real
adapters must agree on the type.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Mapping
from typing import Any


class ErrorClass(enum.StrEnum):
    TRANSIENT = "transient"
    RATE_LIMITED = "rate_limited"
    ORDER_INVALID = "order_invalid"
    PERMANENT = "permanent"
    CONFIGURATION = "configuration"
    LOCAL = "local"
    INTERNAL = "internal"


class AutoTLSError(Exception):
    """Base of every classified failure.

    ``retry_after`` is in seconds from the moment the error was raised (a server's
    Retry-After, already converted from an HTTP date by the adapter); ``problem`` is the
    server's problem document (RFC 7807) when there was one, kept verbatim for the
    journal and the operator. Neither may contain secrets.

    ``keep``: order data a step learnt before the error and must not lose with it (the URL
    of an order the CA just made); the policy writes it with whatever the error leads to.
    """

    error_class: ErrorClass = ErrorClass.TRANSIENT
    keep: Mapping[str, Any] | None = None

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
    """The operator's input is wrong (malformed key, URL, address...), refused before any order
    is touched: nothing to retry. Compare :class:`MisconfiguredError`."""


class MisconfiguredError(AutoTLSError):
    """A setting the operator can fix stands between an order and what it already holds (the
    CA's certificate): the order waits where it is until the setting is fixed. The message
    names the setting that fixes it."""

    error_class = ErrorClass.CONFIGURATION


class LocalIOError(AutoTLSError):
    """Our own filesystem refused an operation (permissions, read-only, full disk...). The
    order keeps everything it holds and tries again with backoff; the message names the path
    and the operation."""

    error_class = ErrorClass.LOCAL

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = os.fspath(path) if path is not None else None

    @classmethod
    def from_os_error(
        cls, exc: OSError, action: str, path: str | os.PathLike[str] | None = None
    ) -> LocalIOError:
        """``cannot write /x/privkey.pem: No space left on device (ENOSPC)``."""
        # The target we meant, rather than the temp file next to it that the OS named.
        where = path if path is not None else exc.filename
        name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
        reason = exc.strerror or str(exc) or type(exc).__name__
        code = f" ({name})" if name else ""
        target = f" {os.fsdecode(where)}" if where is not None else ""
        return cls(f"cannot {action}{target}: {reason}{code}", path=where)


class InternalError(AutoTLSError):
    """A bug in autotls (an exception that is not an :class:`AutoTLSError`), as the engine
    records it. Never fails an order by itself."""

    error_class = ErrorClass.INTERNAL


# -- typed port errors: what a step branches on -------------------------------------------


class AccountUnknownError(PermanentError):
    """The CA does not know the account we signed with (ACME ``accountDoesNotExist``): the
    engine registers the stored key again instead of failing the order."""


class ReplacesRefusedError(OrderInvalidError):
    """The CA refused to let this order ``replaces`` the given certificate (already replaced,
    unknown to it, another account's...): the step orders again without ``replaces``."""


class CertificateUnusableError(PermanentError):
    """The certificate the CA issued fails verification by itself (names, key, dates): no
    setting makes it installable. The order fails and sets the chain aside, so that ``retry``
    orders anew instead of installing it again."""
