"""The worker: claim due orders, run one step each, commit, sleep until the next due time.

* Bounded concurrency: at most ``concurrency`` steps in flight; new claims fill free slots.
* No busy polling: when idle it sleeps until the store's next due time (or ``idle_poll``,
  to notice rows other processes add; :meth:`Worker.wake` cuts the sleep short). While
  :meth:`Worker.run` runs, a move another process commits for one of its peers (an
  operator's ``renew --force``, ``retry``, ``revoke``; a new order) wakes it at once
  (:meth:`~autotls.persistence.store.Store.on_change`): ``idle_poll`` is only the fallback.
* Each claimed order's step runs in a task of its own (:class:`~autotls.fsm.runner.StepRunner`,
  which this class extends: the step, its lease kept alive, the commit, the events).
* On start (:meth:`Worker.prepare`): leases of a dead predecessor on this host (worker ids
  are ``host:pid:random``; its pid is gone) are ended at once instead of waited out, other
  running leases are named with their end, and orders waiting for a configuration fix are
  tried again (this process may have been started with it).
* A database that keeps refusing claims ends :meth:`Worker.run` after ``store_retries``
  attempts with one line naming it (:class:`~autotls.persistence.errors.StoreUnavailableError`).
* Graceful shutdown: stop claiming, give in-flight steps ``grace`` seconds to finish and
  commit, then cancel the rest and release their leases (nothing they did is committed, as
  if the process had died there; the next claim reconciles).
* One bad order never stops the worker (:mod:`~autotls.fsm.runner`), and database errors
  are logged and retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from autotls.fsm.errors import ErrorClass
from autotls.fsm.faults import FaultPlan
from autotls.fsm.ports import Ports
from autotls.fsm.runner import EventListener, OrderEvent, StepObserver, StepRunner, order_fields
from autotls.persistence.changes import Change
from autotls.persistence.errors import StoreUnavailableError, describe_database_error
from autotls.persistence.store import ClaimedOrder, Store

__all__ = [
    "EventListener",
    "OrderEvent",
    "StepObserver",
    "Worker",
    "default_worker_id",
    "order_fields",
    "owner_state",
    "run_until_idle",
]

log = logging.getLogger("autotls.worker")


def default_worker_id() -> str:
    """``host:pid:random``: enough to tell, on the same host, whether the owner still runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_state(owner: str) -> str:
    """What can be told about the worker ``owner`` (an id from :func:`default_worker_id`)
    from this process: ``"dead"`` only when it ran on this host and its pid is gone; else
    why it may be alive. A reused pid reads as alive: the lease is then waited out, the safe
    side (and fencing refuses a late commit either way)."""
    host, sep, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if not sep or not pid_text.isdigit():
        return "not an autotls worker id"
    if host != socket.gethostname():
        return f"on host {host}"
    pid = int(pid_text)
    if pid == os.getpid():
        return "in this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return f"pid {pid} is running"
    return f"pid {pid} is running"


class Worker(StepRunner):
    def __init__(
        self,
        store: Store,
        ports: Ports,
        *,
        worker_id: str | None = None,
        concurrency: int = 4,
        lease: timedelta = timedelta(seconds=60),
        idle_poll: timedelta = timedelta(seconds=30),
        faults: FaultPlan | None = None,
        peers: Collection[str] | None = None,
        store_retries: int | None = 8,
        step_observer: StepObserver | None = None,
    ) -> None:
        """``faults``: where to crash (tests); by default the plan in ``AUTOTLS_FAULTS``, so
        any worker process can be crashed at a named point. ``store_retries``: consecutive
        database failures after which :meth:`run` gives up (None: never)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.store = store
        self.ports = ports
        self.id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease = lease
        self.idle_poll = idle_poll
        self.faults = faults if faults is not None else FaultPlan.from_env()
        self.store_retries = store_retries
        self.peers = frozenset(peers) if peers is not None else None
        self._listeners: list[EventListener] = []
        self.step_observer = step_observer
        self._wake = asyncio.Event()
        self.changes_seen = 0  # wake-ups by another process's commit
        self.steps_run = 0
        self.lost_leases = 0
        self.lease_renewals = 0

    # -- public -------------------------------------------------------------------------------
    def wake(self) -> None:
        """New work may be due now (an order was created or retried)."""
        self._wake.set()

    def _store_changed(self, changes: Sequence[Change]) -> None:
        # Our own commits need no wake-up: the loop already knows what it just did.
        if any(c.concerns(self.peers) and c.actor != self.id for c in changes):
            self.changes_seen += 1
            self.wake()

    async def run_once(self) -> int:
        """Claim what is due now, run those steps concurrently, commit. Returns how many."""
        claimed = await self._claim(self.concurrency)
        if claimed:
            await asyncio.gather(*(self._process(c) for c in claimed))
        return len(claimed)

    async def run(self, stop: asyncio.Event, *, grace: float = 10.0) -> None:
        """Work until ``stop`` is set; then shut down gracefully.

        Raises :class:`~autotls.persistence.errors.StoreUnavailableError` when the database
        refused ``store_retries`` claims in a row (read-only, full, unreachable): a process
        that cannot record progress must end rather than spin."""
        inflight: set[asyncio.Task[None]] = set()
        db_failures = 0
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        unsubscribe = self.store.on_change(self._store_changed)
        try:
            await self.prepare()
            while not stop.is_set():
                free = self.concurrency - len(inflight)
                claimed: list[ClaimedOrder] = []
                # Cleared before the claim, never after it: a wake-up that arrives while we
                # claim or read the next due time must cut the coming sleep short.
                self._wake.clear()
                if free > 0:
                    try:
                        claimed = await self._claim(free)
                        db_failures = 0
                    except Exception as exc:
                        db_failures += 1
                        delay = self._store_trouble(exc, db_failures)
                        await self._sleep(timedelta(seconds=delay), stop_wait, inflight)
                        continue
                for order in claimed:
                    inflight.add(asyncio.ensure_future(self._process(order)))
                if claimed and len(inflight) < self.concurrency:
                    continue  # more may be due right now
                await self._sleep(await self._idle_for(inflight), stop_wait, inflight)
                inflight = {t for t in inflight if not t.done()}
        finally:
            unsubscribe()
            stop_wait.cancel()
            await self._shutdown(inflight, grace)

    async def prepare(self) -> None:
        """What a worker does once when it starts (:meth:`run` calls it):

        * take over the leases of dead predecessors on this host (:meth:`take_over_dead_leases`);
        * make orders that wait for a configuration fix due now: this process may have been
          started with the fix (``--trust-roots``), and they cost no request at the CA;
        * make orders whose account belongs to another ACME directory due now: the operator
          switched CA (``--staging`` to production), and they move to it at once
          (``ca_changed``) instead of at their next renewal."""
        now = self.ports.clock.now()
        try:
            await self.take_over_dead_leases()
            woken = await self.store.make_due(
                now=now, last_error_class=ErrorClass.CONFIGURATION.value, peers=self.peers
            )
            moving = await self.store.make_due(
                now=now, directory_url=self.ports.acme.directory_url, peers=self.peers
            )
        except Exception as exc:
            log.warning("worker start: %s", describe_database_error(exc))
            log.debug("worker start failed", exc_info=True)
            return
        if woken:
            log.info("%d order(s) waiting for a configuration fix: trying them again now", woken)
        if moving:
            log.warning(
                "%d order(s) belong to another ACME directory than %s: ordering anew from it "
                "(their certificates are served until then)",
                moving,
                self.ports.acme.directory_url,
            )

    async def take_over_dead_leases(self) -> list[int]:
        """End the running leases whose owner is provably dead: a worker of this host
        (``host:pid:...``) whose process is gone, as after a crash and restart. Other leases
        are left to expire, with one line saying what is waited for and until when. Returns
        the ids of the orders taken over."""
        now = self.ports.clock.now()
        taken = []
        for lease in await self.store.live_leases(now=now, peers=self.peers):
            if lease.owner == self.id:
                continue
            verdict = owner_state(lease.owner)
            if verdict == "dead" and await self.store.end_lease(lease, now=now):
                taken.append(lease.order_id)
                log.warning(
                    "order %s: took over the lease of %s, whose process is gone",
                    lease.order_id,
                    lease.owner,
                    extra=order_fields(lease.order_id, lease.peer_id, lease.state),
                )
            elif verdict != "dead":
                log.warning(
                    "order %s is leased to worker %s (%s) until %s: waiting for it",
                    lease.order_id,
                    lease.owner,
                    verdict,
                    lease.until.isoformat(timespec="seconds"),
                    extra=order_fields(lease.order_id, lease.peer_id, lease.state),
                )
        return taken

    def _store_trouble(self, exc: BaseException, failures: int) -> float:
        reason = describe_database_error(exc)
        where = self.store.describe()
        if self.store_retries is not None and failures >= self.store_retries:
            log.debug("the database failed %d times in a row", failures, exc_info=True)
            raise StoreUnavailableError(
                f"database {where} is unusable: {reason} ({failures} attempts)"
            ) from exc
        delay = min(60.0, 2.0**failures)
        # One line at the default verbosity; the traceback is for debug logging.
        log.warning(
            "database %s refused to hand out work: %s; retry %d%s in %.0fs",
            where,
            reason,
            failures,
            f" of {self.store_retries - 1}" if self.store_retries is not None else "",
            delay,
        )
        log.debug("database failure", exc_info=True)
        return delay

    # -- loop internals -----------------------------------------------------------------

    async def _claim(self, limit: int) -> list[ClaimedOrder]:
        return await self.store.claim_due(
            self.id,
            now=self.ports.clock.now(),
            lease_seconds=self.lease.total_seconds(),
            limit=limit,
            peers=self.peers,
        )

    async def _idle_for(self, inflight: set[asyncio.Task[None]]) -> timedelta:
        if len(inflight) >= self.concurrency:
            return self.idle_poll
        try:
            due = await self.store.next_due_at(peers=self.peers)
        except Exception as exc:
            log.warning("reading the next due time failed: %s", describe_database_error(exc))
            return timedelta(seconds=5)
        if due is None:
            return self.idle_poll
        return max(timedelta(0), min(self.idle_poll, due - self.ports.clock.now()))

    async def _sleep(
        self,
        duration: timedelta,
        stop_wait: asyncio.Future[Any],
        inflight: set[asyncio.Task[None]],
    ) -> None:
        """Sleep until ``duration`` passes, a step finishes, work is woken, or stop."""
        if duration <= timedelta(0):
            return
        sleeper: asyncio.Future[Any] = asyncio.ensure_future(
            self.ports.clock.sleep_until(self.ports.clock.now() + duration, self._wake)
        )
        waiting: set[asyncio.Future[Any]] = {sleeper, stop_wait, *inflight}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()

    async def _shutdown(self, inflight: set[asyncio.Task[None]], grace: float) -> None:
        if not inflight:
            return
        log.info("stopping: waiting up to %.0fs for %d step(s)", grace, len(inflight))
        _done, pending = await asyncio.wait(inflight, timeout=grace)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def run_until_idle(
    worker: Worker,
    *,
    advance_clock: Callable[[datetime], None] | None = None,
    stop_when: Callable[[], Awaitable[bool]] | None = None,
    max_rounds: int = 10_000,
) -> int:
    """Drive a worker deterministically (tests, replays): run what is due; when nothing is,
    jump the clock (``advance_clock``) to the next due time. Returns the rounds taken."""
    for rounds in range(1, max_rounds + 1):
        if stop_when is not None and await stop_when():
            return rounds
        if await worker.run_once():
            continue
        due = await worker.store.next_due_at(peers=worker.peers)
        if due is None or advance_clock is None:
            return rounds
        advance_clock(max(due, worker.ports.clock.now()))
    raise RuntimeError(f"worker did not settle within {max_rounds} rounds")
