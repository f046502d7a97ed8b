"""When a step looks again: timestamps as the order's data keeps them, and the poll schedule.

Polls go at the CA's pace, not ours (issue 11): a ``Retry-After`` the server sent is
honoured whenever there is one (capped by ``max_poll_interval``: a broken header must not park
an order for days); without one the first re-check comes ``first_poll_interval`` after the wait
began and the interval then grows geometrically up to the poll kind's cap. The schedule keeps
no counter: the interval is the time since the wait began, clamped to ``[first, cap]``, which
doubles from one check to the next. The start of the wait is already persisted (``answered_at``,
``broker_sent_at``, ``authz_valid_at``), so the schedule is data like every other wait
(design.md: steps never sleep).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from autotls.fsm.errors import PermanentError


def iso(moment: datetime) -> str:
    return moment.isoformat()


def parse_time(value: Any, key: str) -> datetime:
    if value is None or value == "":
        raise PermanentError(f"order data lacks {key!r} (was the row edited by hand?)")
    if not isinstance(value, str):
        raise PermanentError(f"order data {key!r} is not a timestamp: {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentError(f"order data {key!r} is not a timestamp: {value!r}") from None
    if parsed.tzinfo is None:
        raise PermanentError(f"order data {key!r} has no timezone: {value!r}")
    return parsed


def poll_interval(
    now: datetime, since: datetime | None, first: timedelta, cap: timedelta
) -> timedelta:
    """The interval before the next check of a wait that began at ``since`` (None: now):
    the time waited so far, at least ``first`` and at most ``cap``. Checks at ``since +
    first``, ``+ 2 first``, ``+ 4 first``... until the gaps reach ``cap``."""
    waited = now - since if since is not None else timedelta(0)
    return max(first, min(waited, cap)) if first < cap else cap


def poll_at(
    now: datetime,
    since: datetime | None,
    retry_after: float | None,
    *,
    first: timedelta,
    cap: timedelta,
    max_wait: timedelta,
) -> datetime:
    """When to check again: after the server's ``Retry-After`` (seconds, already read on the
    engine's clock when it was an HTTP-date) when it sent one, capped by ``max_wait``; else on
    the geometric schedule of :func:`poll_interval`."""
    if retry_after is not None and retry_after > 0:
        return now + min(timedelta(seconds=retry_after), max_wait)
    return now + poll_interval(now, since, first, cap)


def stored_time(value: Any, key: str) -> datetime | None:
    """A timestamp the data may or may not hold (None when absent)."""
    return parse_time(value, key) if value else None
