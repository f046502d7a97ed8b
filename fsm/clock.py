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
    """A clock that only moves when told to. Sleepers wake as :meth:`advance` passes them."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()
        self._fell_asleep: list[asyncio.Future[None]] = []

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
        waiting, self._fell_asleep = self._fell_asleep, []
        for someone in waiting:
            if not someone.done():
                someone.set_result(None)
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

    async def until_sleepers(self, count: int) -> None:
        """Until at least ``count`` coroutines sleep on this clock: the code under test has
        reached its wait (tests synchronise on this, never on a sleep)."""
        while self.sleepers < count:
            fell_asleep: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._fell_asleep.append(fell_asleep)
            await fell_asleep

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
