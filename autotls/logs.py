"""Keeping secrets out of log lines, whoever writes them (design.md rule 11).

autotls never logs a key, a bearer token or an EAB HMAC. Libraries it uses may: at debug
level aiosqlite logs every call it hands to its thread, statement parameters included, and
those parameters are the account and certificate keys. The store creates its engines with
``hide_parameters=True`` (SQLAlchemy's own echo and its exception messages); for everything
else, :class:`SecretFilter` on a handler rewrites each record it passes so that no PEM private
key reaches the output, at any verbosity. The CLI installs it on its stderr handler; an
embedding application that turns on debug logging for those libraries should do the same::

    handler.addFilter(autotls.SecretFilter())
"""

from __future__ import annotations

import logging
import re

REDACTED_KEY = "[redacted private key]"

# A PEM private key (any algorithm, encrypted or not), as text or as the repr of a string or
# bytes (newlines as "\n"); a block cut short by a log line's end is redacted to the end.
_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)


def redact(text: str) -> str:
    """``text`` without PEM private keys."""
    return _PEM_KEY.sub(REDACTED_KEY, text)


class SecretFilter(logging.Filter):
    """Rewrites records so no PEM private key is formatted into the output (message, its
    arguments, and any exception text). Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        if "PRIVATE KEY" in message:
            record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            formatted = logging.Formatter().formatException(record.exc_info)
            if "PRIVATE KEY" in formatted:
                record.exc_text = redact(formatted)
                record.exc_info = None
                record.msg = f"{record.msg}\n{record.exc_text}"
                record.exc_text = None
        return True
