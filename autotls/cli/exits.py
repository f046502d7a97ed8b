"""How a command ends: the exit codes, the errors the command line raises itself, and the
exit code and one-line message for whatever exception ended a command.

Exit codes (stable; scripts may rely on them):

* ``0`` success;
* ``1`` the issuance or operation failed (permanent failure, demo or TLS check failed, the
  CA refused, the order is not in a state the action needs);
* ``2`` usage or configuration error (bad arguments or environment variables, a malformed,
  unreadable or corrupt key file, a bad URL, multiaddr or DNS server, an unknown order id);
* ``3`` database problem (missing, unusable, or its schema needs ``db upgrade`` or is newer
  than this autotls; a running node whose database kept refusing its work);
* ``75`` (``EX_TEMPFAIL``) ``run --once`` could not finish by ``--deadline``: the order's next
  attempt comes later (the broker cannot dial the node, the CA asked to wait...). The order
  is kept as it stands and the next run resumes it, so a timer may simply run it again;
* ``130`` interrupted (SIGINT; SIGTERM too, except for ``run`` without ``--once``, where
  SIGTERM is the normal way to stop and exits 0 once node, worker and store are closed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autotls.cli.output import one_line
from autotls.fsm.errors import AutoTLSError, ConfigurationError, ErrorClass
from autotls.persistence.errors import (
    ActiveOrderExistsError,
    DatabaseURLError,
    OrderBusyError,
    OrderNotFoundError,
    OrderStateError,
    StoreError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: try again later
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure with its exit code and the one line that explains it."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    exit_code = EXIT_USAGE


class DatabaseProblem(CliError):
    exit_code = EXIT_DATABASE


class OperationFailed(CliError):
    exit_code = EXIT_FAILED


def _raised_as(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)`` without importing ``module``: an exception of a class
    whose module was never loaded cannot have been raised, and importing the service or
    SQLAlchemy just to rule that out would slow down every failing quick command."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(exc, cls)


def exit_code_for(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message for an exception that ended a command."""
    if isinstance(exc, CliError):
        return exc.exit_code, str(exc)
    if isinstance(exc, DatabaseURLError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OrderNotFoundError):
        return EXIT_USAGE, f"{exc} (see `autotls status`)"
    if isinstance(exc, (OrderBusyError, OrderStateError, ActiveOrderExistsError)):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, StoreError):
        return EXIT_DATABASE, str(exc)
    if _raised_as(exc, "sqlalchemy.exc", "SQLAlchemyError"):
        return EXIT_DATABASE, f"database problem: {sqlalchemy_reason(exc)}"
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc)
    if _raised_as(exc, "autotls.service", "DeadlineExceeded"):
        return EXIT_TEMPFAIL, f"{exc}; the order is kept; the next run resumes it"
    if _raised_as(exc, "autotls.node", "NodeError") and (
        getattr(exc, "error_class", None) is ErrorClass.PERMANENT
    ):
        return EXIT_USAGE, str(exc)
    if _raised_as(exc, "autotls.service", "IssuanceFailed") or isinstance(exc, AutoTLSError):
        return EXIT_FAILED, str(exc)
    if _raised_as(exc, "autotls.localstack.pebble", "PebbleError"):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return EXIT_FAILED, f"{exc.strerror or exc}{where}"
    return EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc}"


def sqlalchemy_reason(exc: BaseException) -> str:
    """The driver's own message (``orig``) when there is one: SQLAlchemy's wrapper adds the
    statement and a link, which say nothing to an operator."""
    orig = getattr(exc, "orig", None)
    return one_line(str(orig if orig is not None else exc), 300)


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
