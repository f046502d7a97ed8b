"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, Text
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class CorruptJSON:
    """What a JSON column yields when the stored text does not decode to an object.

    Returned instead of raised so that one corrupt row can be reported and set aside by the
    worker without stopping the claim of every other row."""

    __slots__ = ("error", "raw")

    def __init__(self, raw: str, error: str) -> None:
        self.raw = raw
        self.error = error

    def __repr__(self) -> str:
        return f"CorruptJSON({self.error})"


class JSONObject(TypeDecorator[Any]):
    """A JSON object stored as text (sorted keys, so rows diff cleanly)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if isinstance(value, CorruptJSON):
            return value.raw
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        try:
            decoded = json.loads(value)
        except ValueError as exc:
            return CorruptJSON(value, f"not JSON: {exc}")
        if not isinstance(decoded, dict):
            return CorruptJSON(value, f"expected a JSON object, found {type(decoded).__name__}")
        return decoded
