"""Time, injected (design.md rule 9). The engine never calls ``datetime.now`` or
``asyncio.sleep`` directly; tests drive a :class:`ManualClock` and never sleep to synchronise."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event | None = None) -> None:
        """Return at ``deadline``, or earlier when ``wake`` is set."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event | None = None) -> None:
        delay = (deadline - self.now()).total_seconds()
        if delay <= 0:
            return
        if wake is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=delay)


class ManualClock:
    """A clock that only moves when told to. Sleepers wake as :meth:`advance` passes them; a
    test awaits :meth:`sleeping` to know that a task now waits on the clock."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self._watchers: list[asyncio.Future[None]] = []

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        if moment < self._now:
            raise ValueError("ManualClock cannot go backwards")
        self._now = moment
        self._wake_due()

    def advance(self, seconds: float = 0.0, **kwargs: float) -> datetime:
        self.set(self._now + timedelta(seconds=seconds, **kwargs))
        return self._now

    async def sleep_until(self, deadline: datetime, wake: asyncio.Event | None = None) -> None:
        if deadline <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._counter), fut))
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)
        if wake is None:
            await fut
            return
        waiter: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
        pending: set[asyncio.Future[Any]] = {fut, waiter}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not fut.done():
                fut.cancel()

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def sleeping(self, count: int = 1) -> None:
        """Return once at least ``count`` tasks sleep on this clock."""
        while self.sleepers < count:
            watcher: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            await watcher

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
