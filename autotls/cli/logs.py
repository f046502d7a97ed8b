"""Logging for the command's lifetime: one stderr handler, quiet by default (``autotls:
WARNING: ...``), timestamps and debug logs with ``-v``, the libraries' debug logs with
``-vv``; py-libp2p's detached loggers are routed through it too."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from autotls.cli.options import PROG

_OUR_LOGGERS = ("autotls",)
_NOISY_LOGGERS = ("aiosqlite", "asyncio", "sqlalchemy", "alembic", "multiaddr", "trio")


def _libp2p_level(verbosity: int) -> int:
    return (logging.CRITICAL, logging.WARNING, logging.DEBUG)[min(verbosity, 2)]


class _Libp2pFilter(logging.Filter):
    """Some py-libp2p modules set their own logger level (INFO), which a level on the
    ``libp2p`` logger cannot override once its records propagate: drop them here."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "libp2p" or record.name.startswith("libp2p."):
            return record.levelno >= self.level
        return True


@contextlib.contextmanager
def stderr_logging(verbosity: int) -> Iterator[None]:
    """stderr logging for the command's lifetime; whatever was configured before comes back."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    if verbosity:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
    handler.addFilter(_Libp2pFilter(_libp2p_level(verbosity)))
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
    try:
        yield
    finally:
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
