"""What the command line prints and how: results on stdout, progress, warnings and the
one-line error on stderr, and the formatting both share (times, tables, short peer ids).

stderr has two formats (``run --log-format``): ``human`` lines, or ``json``, where every
line on stderr -- progress, log records, the final error -- is one JSON object with
``time``, ``level``, ``logger`` and ``message``, plus ``order_id``, ``peer``, ``state``,
``trigger`` and ``error_class`` when the line is about an order (:data:`ORDER_FIELDS`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

# What a line about an order carries, in JSON under these keys (log records carry them as
# attributes, through ``extra=``).
ORDER_FIELDS = ("order_id", "peer", "state", "trigger", "error_class")
PROGRESS_LOGGER = "autotls.cli"

_json_lines = False


def use_json_lines(enabled: bool) -> None:
    """stderr carries JSON objects (``--log-format json``) from now on, or human lines."""
    global _json_lines
    _json_lines = enabled


def json_line(
    *,
    level: str,
    logger: str,
    message: str,
    fields: Mapping[str, object] | None = None,
    at: datetime | None = None,
) -> str:
    """One stderr line in the JSON format: never more than one line, whatever the message."""
    moment = (at or datetime.now(UTC)).astimezone(UTC)
    record: dict[str, object] = {
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    for key, value in (fields or {}).items():
        if value is not None:
            record[key] = value
    return json.dumps(record, default=str, ensure_ascii=False)


def out(line: str = "") -> None:
    print(line, file=sys.stdout, flush=True)


def err(line: str, *, level: str = "info", **fields: object) -> None:
    """A progress, warning or error line on stderr; ``fields`` (an order's id, state...)
    show in the JSON format only."""
    if _json_lines:
        line = json_line(level=level, logger=PROGRESS_LOGGER, message=line, fields=fields)
    # One write per line, as logging's handler does: print() writes the text and the newline
    # separately, and a record logged from another thread (aiosqlite's, py-libp2p's) between
    # the two would share the line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def listed_whole(records: Sequence[Mapping[str, object]], *, as_json: bool, none: str) -> bool:
    """What every listing command starts with: with ``--json``, the records as one JSON
    array; else, when there are none, the line ``none``. True when that said it all."""
    if as_json:
        out(json.dumps(records, indent=2, sort_keys=True))
        return True
    if not records:
        out(none)
        return True
    return False


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def relative(moment: datetime, now: datetime) -> str:
    seconds = (moment - now).total_seconds()
    span = abs(seconds)
    if span < 90:
        text = f"{span:.0f}s"
    elif span < 90 * 60:
        text = f"{span / 60:.0f}m"
    elif span < 36 * 3600:
        text = f"{span / 3600:.0f}h"
    else:
        text = f"{span / 86400:.0f}d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def short_peer(peer: str | None) -> str:
    if not peer:
        return "-"
    return peer if len(peer) <= 20 else f"{peer[:10]}…{peer[-6:]}"


def one_line(text: str, limit: int | None = None) -> str:
    flat = " ".join(text.split())
    if limit is not None and len(flat) > limit:
        return flat[: limit - 1] + "…"
    return flat


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
