"""Reading and writing the journal safely.

Journal details are for operators and replays: they must never carry a secret (design.md
rule 11). :func:`sanitize` is applied to every detail the engine writes, whatever a step put
in it; :func:`path` turns an order's journal into the walk through the machine it took.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from autotls.fsm.machine import Trigger, is_valid_path
from autotls.persistence.records import JournalRecord

SECRET_HINTS = ("key", "pem", "secret", "bearer", "token", "authorization", "password", "sig")
MAX_STRING = 500
MAX_DEPTH = 4


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(hint in lowered for hint in SECRET_HINTS)


def sanitize(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` without secret-looking fields and with long text cut."""
    if depth > MAX_DEPTH:
        return "..."
    if isinstance(value, Mapping):
        return {
            str(k): sanitize(v, depth + 1) for k, v in value.items() if not _secret_name(str(k))
        }
    if isinstance(value, (list, tuple)):
        return [sanitize(v, depth + 1) for v in value[:50]]
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + "..."
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return sanitize(str(value), depth + 1)


def moves(
    entries: Iterable[JournalRecord], *, retries: bool = False
) -> list[tuple[str | None, str, str]]:
    """The journal's moves as ``(from, to, trigger)``; without ``retries``, the classified
    errors after which the order stayed (``retry_later``) are left out, as a diagram of the
    order's walk wants them."""
    return [
        (entry.from_state, entry.to_state, entry.trigger)
        for entry in entries
        if retries or entry.trigger != Trigger.RETRY_LATER
    ]


def is_valid_journal(entries: Sequence[JournalRecord]) -> bool:
    """Every entry is a declared move, and together they walk the machine from creation."""
    return is_valid_path(moves(entries, retries=True))
