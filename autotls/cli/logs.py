"""Logging for the command's lifetime: one stderr handler, quiet by default (``autotls:
WARNING: ...``), timestamps and debug logs with ``-v``, the libraries' debug logs with
``-vv``; py-libp2p's detached loggers are routed through it too, and silenced unless asked.

The handler writes human lines or, with ``run --log-format json``, one JSON object per
record (:class:`JsonFormatter`). Whatever the format and the verbosity, records pass
:class:`autotls.logs.SecretFilter` on their way out: at ``-vv`` SQLAlchemy and aiosqlite log
the rows and statement parameters that hold the account and certificate keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

from autotls.cli.options import PROG
from autotls.cli.output import ORDER_FIELDS, json_line, use_json_lines

_OUR_LOGGERS = ("autotls",)
_NOISY_LOGGERS = ("aiosqlite", "asyncio", "sqlalchemy", "alembic", "multiaddr", "trio")


def _libp2p_level(verbosity: int) -> int:
    return (logging.CRITICAL, logging.WARNING, logging.DEBUG)[min(verbosity, 2)]


class _Libp2pFilter(logging.Filter):
    """py-libp2p's records at the level asked for (none at the default verbosity), whichever
    way they come:

    * some of its modules set their own logger level (INFO), which a level on the ``libp2p``
      logger cannot override once their records propagate;
    * some log on the *root* logger (``logging.warning(...)`` in
      ``libp2p/network/connection/swarm_connection.py``: "Error while closing muxed
      connection", "Error resetting stream"), past every ``libp2p`` logger: they are told by
      the file they come from."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if _from_libp2p(record):
            return record.levelno >= self.level
        return True


def _from_libp2p(record: logging.LogRecord) -> bool:
    if record.name == "libp2p" or record.name.startswith("libp2p."):
        return True
    if record.name != "root":
        return False
    package = sys.modules.get("libp2p")  # a record from its code means it is loaded
    folders = getattr(package, "__path__", None) or ()
    return any(record.pathname.startswith(os.path.join(folder, "")) for folder in folders)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, the order fields a record carries (``extra={"order_id": ..., ...}``), and
    ``exc`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {name: getattr(record, name, None) for name in ORDER_FIELDS}
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exc"] = record.exc_text
        return json_line(
            level=record.levelname.lower(),
            logger=record.name,
            message=record.getMessage(),
            fields=fields,
            at=datetime.fromtimestamp(record.created, UTC),
        )


@contextlib.contextmanager
def stderr_logging(verbosity: int, log_format: str = "human") -> Iterator[None]:
    """stderr logging for the command's lifetime; whatever was configured before comes back."""
    from autotls.logs import SecretFilter

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif verbosity:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    if not verbosity:
        handler.setLevel(logging.WARNING)
    handler.addFilter(_Libp2pFilter(_libp2p_level(verbosity)))
    handler.addFilter(SecretFilter())
    touched = [
        root,
        *(logging.getLogger(n) for n in (*_OUR_LOGGERS, *_NOISY_LOGGERS, "transitions")),
    ]
    saved = [(logger, logger.level) for logger in touched]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity == 0 else logging.DEBUG)
    for name in _OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity else logging.NOTSET)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)
    # transitions logs every state change at INFO: the worker reports those itself.
    logging.getLogger("transitions").setLevel(logging.DEBUG if verbosity else logging.WARNING)
    use_json_lines(log_format == "json")
    try:
        yield
    finally:
        use_json_lines(False)
        root.removeHandler(handler)
        for logger, level in saved:
            logger.setLevel(level)


def quiet_libp2p(verbosity: int) -> None:
    """py-libp2p's import detaches its ``libp2p`` logger (propagate off, no handler), so its
    warnings about the broker's throw-away dial-back connections reach stderr through
    Python's last-resort handler. Route them through ours and, unless asked, silence them."""
    try:
        import libp2p  # noqa: F401 - imported for its logging side effect
    except ImportError:
        return  # the node reports the missing extra when it starts
    logger = logging.getLogger("libp2p")
    logger.propagate = True
    logger.setLevel(_libp2p_level(verbosity))
